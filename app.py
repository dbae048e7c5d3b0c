"""JPQ Explorer, landing page: the stereo network on the Middlebury motorcycle pair, next to SGBM.

Run with `make app` (or `streamlit run app.py`). Pages in `pages/` add the classifier and synthetic scenes.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from jpq_core.ui import cached_comparison, cached_stereo_network, stereo_sample, show_error
from jpq_core.errors import JPQError
from jpq_core.plots import disparity_figure, rgb_figure

st.set_page_config(page_title="JPQ Explorer", layout="wide")
st.title("JPQ Explorer")
st.caption(
    "Joint pruning and quantization of neural networks (after Yu, Wu, Klopp et al., 2020). "
    "This page runs the dense stereo network that later pages compress, on a real stereo pair."
)

with st.sidebar:
    source = st.radio("Stereo pair", ["Middlebury motorcycle", "Synthetic scene"], key="source")
    seed = st.number_input("Scene (validation split)", 0, 9999, 0, key="seed") if source == "Synthetic scene" else 0

try:
    model = cached_stereo_network()
    sample = stereo_sample(source, int(seed))
    result = cached_comparison(source, int(seed))
except JPQError as exc:
    show_error(exc)
    st.stop()

net, sgbm = result["network"], result["sgbm"]
st.subheader(f"{sample.name}: {sample.shape[1]}x{sample.shape[0]} px")
cols = st.columns(5)
cols[0].metric("Network bad-3", f"{net['metrics']['bad3']:.1%}",
               delta=f"{net['metrics']['bad3'] - sgbm['metrics']['bad3']:+.1%} vs SGBM", delta_color="inverse")
cols[1].metric("SGBM bad-3", f"{sgbm['metrics']['bad3']:.1%}")
cols[2].metric("Network EPE", f"{net['metrics']['epe']:.2f} px",
               delta=f"{net['metrics']['epe'] - sgbm['metrics']['epe']:+.2f} px vs SGBM", delta_color="inverse")
cols[3].metric("SGBM EPE", f"{sgbm['metrics']['epe']:.2f} px", help=f"over the {sgbm['metrics']['coverage']:.0%} of pixels SGBM matched")
cols[4].metric("Network time", f"{net['seconds'] * 1000:.0f} ms", help="measured on this machine, dense float32 PyTorch")
st.caption("bad-3: share of pixels with valid ground truth whose disparity is off by more than 3 px; "
           "pixels a method leaves unmatched count as bad. EPE: mean absolute error over matched pixels.")

zmax = float(np.nanmax(np.where(np.isfinite(sample.disparity), sample.disparity, np.nan))) * 1.1
error = np.where(np.isfinite(sample.disparity), np.abs(net["disparity"] - sample.disparity), np.nan)
row1 = st.columns(3)
row1[0].plotly_chart(rgb_figure(sample.left, "Left image"), width="stretch")
row1[1].plotly_chart(disparity_figure(sample.disparity, "Ground truth", zmax), width="stretch")
row1[2].plotly_chart(disparity_figure(net["disparity"], "Network (dense)", zmax), width="stretch")
row2 = st.columns(3)
row2[0].plotly_chart(disparity_figure(error, "Network error", 10.0, error=True), width="stretch")
row2[1].plotly_chart(disparity_figure(sgbm["disparity"], "OpenCV SGBM", zmax), width="stretch")
row2[2].markdown(
    "**What you are looking at.** The network sees only the two images. It was trained from scratch on "
    "synthetic scenes with exact ground truth, never on this pair. SGBM is the classical semi-global "
    "matcher (numDisparities=64, blockSize=5, 3-way). Blank SGBM pixels are those it could not match."
)
