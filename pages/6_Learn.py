"""Learn: seven short lessons on pruning and quantization, each computed live on ResNet-20 by the library."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app_support.ui import cached_network, cached_task, live_result, show_error
from jpq_core import analysis, lessons
from jpq_core.errors import JPQError
from jpq_core.live import LiveConfig
from jpq_core.plots import (criteria_scatter_figure, layer_error_figure, mask_agreement_figure, memory_lesson_figure,
                            pareto_lesson_figure, quantization_figure, ste_figure, zero_value_figure)
from jpq_core.sweeps import pareto_mask

st.set_page_config(page_title="Learn - JPQ Explorer", layout="wide")
st.title("Learn: pruning and quantization in seven lessons")
st.caption("Every number and figure below is computed now, by the same library that compresses the networks, on "
           "the shipped ResNet-20 (digits). Each lesson ends with something to try.")

NETWORK = "resnet20"
HELD_OUT = 192  # held-out test images for the loss in lessons 1 and 3: enough to rank, fast to run


def try_this(text: str) -> None:
    st.info(f"**Try this:** {text}")


@st.cache_resource(show_spinner="Loading ResNet-20 and its gradient statistics...")
def _lessons() -> lessons.Lessons:
    return lessons.Lessons(cached_network(NETWORK), cached_task(NETWORK), held_out=HELD_OUT)


try:
    course = _lessons()
except JPQError as exc:
    show_error(exc)
    st.stop()
model, stats, geometry, images, labels = course.model, course.stats, course.geometry, course.images, course.labels
layer_names = course.layers

tabs = st.tabs(["1 · What pruning removes", "2 · The quantization grid", "3 · Why zero stays exact",
                "4 · Straight-through estimator", "5 · Sparsity × bits", "6 · Reading a Pareto plot",
                "7 · Repair without training"])

# ---- 1 ------------------------------------------------------------------------------------------------
with tabs[0]:
    st.markdown("Magnitude pruning keeps the largest |w|. Taylor pruning keeps the largest |g·w|: a weight matters "
                "if removing it changes the loss, which needs its gradient g as well (Molchanov et al. 2017). Here "
                "**one layer** is pruned by each, the rest of the network left alone, and the loss on "
                f"{HELD_OUT} held-out digits is measured.")
    cols = st.columns(2)
    layer = cols[0].selectbox("Layer", layer_names, index=0, key="l1_layer")
    sparsity = cols[1].slider("Sparsity of this layer", 0.1, 0.95, 0.5, 0.05, key="l1_sparsity")
    result = course.prune_layer(layer, sparsity)
    dense = result["dense"]
    cols = st.columns(3)
    cols[0].metric("Loss, dense", f"{dense['loss']:.4f}", help=f"top-1 {dense['top1']:.1%} on {HELD_OUT} held-out images")
    for col, name in zip(cols[1:], ("magnitude", "taylor")):
        col.metric(f"Loss, {name}-pruned", f"{result[name]['loss']:.4f}",
                   delta=f"{result[name]['loss'] - dense['loss']:+.4f}", delta_color="inverse",
                   help=f"top-1 {result[name]['top1']:.1%} on {HELD_OUT} held-out images")
    category = analysis.agreement_grid(result["magnitude"]["mask"], result["taylor"]["mask"]).ravel()
    left, right = st.columns(2)
    left.plotly_chart(criteria_scatter_figure(result["scores"]["magnitude"], result["scores"]["taylor"], category,
                                              "magnitude", "taylor", f"{layer}: each weight by both scores"),
                      width="stretch", key="l1_scatter")
    shape = model.get_submodule(layer).weight.shape
    grid = analysis.agreement_grid(result["magnitude"]["mask"].reshape(shape), result["taylor"]["mask"].reshape(shape))
    right.plotly_chart(mask_agreement_figure(grid, "magnitude", "taylor", tuple(shape[2:]) or (1, 1), f"{layer}: the kernels"),
                       width="stretch", key="l1_mask")
    st.caption("Magnitude's threshold is a vertical line in the scatter, Taylor's a horizontal one: the blue and "
               "red points are where they disagree.")
    try_this("raise the sparsity step by step and watch which loss climbs first. Then pick a layer deep in "
             "stage 3: are the two criteria closer or further apart there?")

# ---- 2 ------------------------------------------------------------------------------------------------
with tabs[1]:
    st.markdown("A b-bit uniform quantizer maps every weight to the nearest of 2^b - 1 levels "
                "s·k (symmetric: s = max|w| / (2^(b-1) - 1)), per tensor here. 1 bit is binary {-a, +a} "
                "(XNOR-Net), 2 bits ternary {-a, 0, +a} (TWN). The error is measured as SQNR = "
                "10·log10(Σw² / Σ(ŵ - w)²).")
    cols = st.columns(3)
    q_layer = cols[0].selectbox("Layer", layer_names, index=layer_names.index("stage2.0.conv1")
                                if "stage2.0.conv1" in layer_names else 0, key="l2_layer")
    bits = cols[1].select_slider("Bits", [1, 2, 3, 4, 5, 6, 7, 8], value=4, key="l2_bits")
    symmetric = cols[2].checkbox("Symmetric grid", value=True, key="l2_symmetric",
                                 help="unticked: asymmetric min/max grid with an integer zero point")
    q = course.quantize(q_layer, bits, symmetric)
    cols = st.columns(4)
    cols[0].metric("Levels", f"{len(q['levels'])}")
    cols[1].metric("RMS rounding error", f"{q['rmse']:.2e}")
    cols[2].metric("Largest error", f"{q['max_error']:.2e}")
    cols[3].metric("SQNR", f"{q['sqnr_db']:.1f} dB")
    st.caption("Red lines: the grid's levels (drawn up to 64 of them, i.e. 6 bits symmetric).")
    st.plotly_chart(quantization_figure(q["weight"], q["error"], q["levels"],
                                        f"{q_layer}: {len(q['weight'])} weights at {bits} bits"),
                    width="stretch", key="l2_figure")
    try_this("step from 3 to 8 bits and note the SQNR at each: theory says +6.02 dB per bit for a uniform grid. "
             "Where does the measured gain fall short, and why do 1 and 2 bits not follow the rule?")

# ---- 3 ------------------------------------------------------------------------------------------------
with tabs[2]:
    st.markdown("Pruning sets weights to exactly 0. An asymmetric grid lo + s·k spanning [min, max] has a level at 0 "
                "only if -lo/s is a whole number, which it almost never is: every pruned weight comes back as the "
                "nearest level, up to s/2 from 0, and the network is dense again. With an **integer zero point** "
                "z = round(-lo/s), the grid is s·(k - z) and k = z is exactly 0 (Jacob et al. 2018), as in this "
                "library. Below, all layers (but the first and last) are magnitude-pruned, then quantized per tensor "
                "both ways.")
    cols = st.columns(2)
    z_sparsity = cols[0].slider("Sparsity", 0.3, 0.9, 0.5, 0.1, key="l3_sparsity")
    z_bits = cols[1].select_slider("Bits", [3, 4, 5, 6, 8], value=6, key="l3_bits")
    z = course.zero_point(z_sparsity, z_bits)
    rows = []
    for variant in ("exact zero", "no zero point"):
        v = z[variant]
        rows.append({"grid": variant, "non-zero weights": v["nonzero"], "weight memory (KiB)": v["memory_bits"] / 8192,
                     "MACs (M)": v["macs"] / 1e6, f"loss ({HELD_OUT} images)": v["loss"], "top-1": v["top1"]})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"non-zero weights": st.column_config.NumberColumn(format="percent"),
                                "top-1": st.column_config.NumberColumn(format="percent"),
                                "weight memory (KiB)": st.column_config.NumberColumn(format="%.1f"),
                                "MACs (M)": st.column_config.NumberColumn(format="%.2f"),
                                f"loss ({HELD_OUT} images)": st.column_config.NumberColumn(format="%.4f")})
    st.plotly_chart(zero_value_figure(z["zero_value"], "Without a zero point, a pruned weight becomes..."),
                    width="stretch", key="l3_figure")
    st.caption(f"{z['pruned_share']:.1%} of the weights were pruned. Memory and MACs come from the cost model "
               "(jpq_core.costs): a weight that is not exactly zero must be stored and multiplied.")
    try_this("lower the bits to 3: the step s grows, so the pruned weights land further from zero. Compare the "
             "loss of the two rows, then raise the sparsity: more weights are wrongly revived.")

# ---- 4 ------------------------------------------------------------------------------------------------
with tabs[3]:
    st.markdown("Training a quantized network needs dL/dw through Q(w) = s·round(w/s), whose derivative is 0 "
                "everywhere except at the jumps. The straight-through estimator (Bengio et al. 2013) uses the "
                "rounded value forward and pretends dQ/dw = 1 backward. A one-weight model y = Q(w)·x is fitted "
                "to y = a·x, with torch's own autograd.")
    cols = st.columns(4)
    target = cols[0].slider("Target a", -1.5, 1.5, 0.6, 0.05, key="l4_target")
    step = cols[1].select_slider("Grid step s", [0.1, 0.25, 0.5, 1.0], value=0.25, key="l4_step")
    lr = cols[2].select_slider("Learning rate", [0.05, 0.1, 0.3, 0.6, 1.0], value=0.3, key="l4_lr")
    start = cols[3].slider("Start w", -1.5, 1.5, -1.0, 0.05, key="l4_start")
    trajectory = lessons.ste_lesson(target, step, lr, steps=40, start=start)
    st.plotly_chart(ste_figure(lessons.ste_landscape(target, step), trajectory), width="stretch", key="l4_figure")
    cols = st.columns(2)
    for col, (method, df) in zip(cols, trajectory.groupby("method", sort=False)):
        first, last = df.iloc[0], df.iloc[-1]
        col.metric(f"{method}: final Q(w)", f"{last['q']:.3f}", delta=f"loss {last['loss']:.4f}", delta_color="off",
                   help=f"gradient at the start: {first['gradient']:.3g}; w moved from {first['w']:.3f} to {last['w']:.3f}")
    try_this("pick a target between two grid levels (say 0.6 with step 0.25): the straight-through w does not "
             "settle, it hops between the two nearest levels. That is the oscillation QAT papers fight. With the "
             "true gradient, nothing you set makes w move.")

# ---- 5 ------------------------------------------------------------------------------------------------
SPARSITY_STOPS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
BIT_STOPS = (1, 2, 4, 8, 16, None)
with tabs[4]:
    st.markdown("BOPs = non-zero MACs × weight bits × activation bits, so sparsity and bit width multiply "
                "exactly. Memory almost multiplies, but a sparse layer must also say **where** its weights are: "
                "a bitmask costs 1 bit per weight, CSR 2-8 bits per kept weight (the gap to the previous one, plus a "
                "filler for gaps too long for that width; the width is chosen per layer). The "
                "cost model picks the cheapest of dense, bitmask and CSR, and adds the scales and biases.")
    cols = st.columns(3)
    m_layer = cols[0].selectbox("Layer", layer_names, index=layer_names.index("stage3.0.conv2")
                                if "stage3.0.conv2" in layer_names else 0, key="l5_layer")
    m_sparsity = cols[1].select_slider("Sparsity", SPARSITY_STOPS, value=0.9, format_func=lambda s: f"{s:.0%}", key="l5_sparsity")
    m_bits = cols[2].select_slider("Weight bits", BIT_STOPS, value=4, format_func=lambda b: "float" if b is None else str(b),
                                   key="l5_bits")
    table = course.memory(m_layer, SPARSITY_STOPS, BIT_STOPS)
    row = table[(table["sparsity"] == m_sparsity) & (table["wbits"] == (m_bits or 32))].iloc[0]
    cols = st.columns(4)
    cols[0].metric("Weight memory", f"{row['memory_ratio']:.2%} of dense", help=f"{row['weight_bits'] / 8192:.2f} KiB")
    cols[1].metric("Without index bits", f"{row['ideal_ratio']:.2%} of dense", help="(1 - sparsity) × bits / 32")
    cols[2].metric("Encoding chosen", row["encoding"])
    cols[3].metric("BOPs", f"{row['bops_ratio']:.3%} of dense",
                   help="activation bits 8 here; (1 - sparsity) × (b_w / 32) × (8 / 32) exactly")
    st.plotly_chart(memory_lesson_figure(table, (m_sparsity, row["memory_ratio"])), width="stretch", key="l5_figure")
    try_this("at 1 bit, move the sparsity from 0% to 50%: memory does not fall at all, because a bitmask (1 bit "
             "per weight) is as large as the 1-bit weights it saves. Then find the sparsity where 8 bits switch "
             "from a bitmask to CSR.")

# ---- 6 ------------------------------------------------------------------------------------------------
PARETO_GRID = [(c, s, b) for c in ("magnitude", "taylor") for s in (0.5, 0.8, 0.9) for b in (4, 8)]
AXES = {"memory_ratio": "weight memory / dense", "bops_ratio": "BOPs / dense"}
with tabs[5]:
    st.markdown("Compression trades accuracy for size. A configuration is **dominated** when another is at least as "
                "good on both axes and better on one; the ones left form the Pareto front, the only ones worth "
                "choosing from. Here: live compressions of ResNet-20 without fine-tuning, by two criteria at three "
                "sparsities and two weight widths (activations 8 bits).")
    if st.button(f"Compute the {len(PARETO_GRID)} compressions", key="l6_run",
                 help="each: prune, quantize, calibrate activations, evaluate on the test split; shared with Explore's cache") \
            or st.session_state.get("l6_ready"):
        bar = st.progress(0.0, text="Compressing...")
        points, started = [], time.perf_counter()
        try:
            for i, (criterion, s, b) in enumerate(PARETO_GRID):
                result = live_result(LiveConfig(network=NETWORK, criterion=criterion, sparsity=s, wbits=b, abits=8))
                points.append({"label": f"{criterion}, {s:.0%} sparse, {b}-bit", "top1": result.evaluation.metrics["top1"],
                               "memory_ratio": result.cost["memory_ratio"], "bops_ratio": result.cost["bops_ratio"]})
                bar.progress((i + 1) / len(PARETO_GRID), text=f"Compressed {i + 1} of {len(PARETO_GRID)}")
        except JPQError as exc:
            show_error(exc)
            st.stop()
        bar.empty()
        if not st.session_state.get("l6_ready"):
            st.caption(f"Computed in {time.perf_counter() - started:.1f} s (kept for this session).")
        st.session_state["l6_ready"] = True
        table = pd.DataFrame(points)
        cols = st.columns(2)
        axis = cols[0].radio("Cost axis", list(AXES), format_func=AXES.get, horizontal=True, key="l6_axis")
        chosen = cols[1].selectbox("Look at one point", range(len(table)), format_func=lambda i: table["label"][i],
                                   key="l6_point")
        table["front"] = pareto_mask(table[axis].tolist(), table["top1"].tolist(), True, False)
        st.plotly_chart(pareto_lesson_figure(table, axis, "top1", AXES[axis], "top-1 accuracy (no fine-tuning)", chosen),
                        width="stretch", key="l6_figure")
        beaten_by = lessons.dominators(table[axis].tolist(), table["top1"].tolist(), chosen, True, False)
        if beaten_by:
            st.write(f"**{table['label'][chosen]}** is dominated by: "
                     + "; ".join(f"{table['label'][j]} (top-1 {table['top1'][j]:.1%}, {table[axis][j]:.2%})" for j in beaten_by))
        else:
            st.write(f"**{table['label'][chosen]}** is on the front: nothing here is both smaller and more accurate.")
    try_this("compute the points, then switch the cost axis from memory to BOPs: does the front keep the same "
             "points? Is any 8-bit configuration beaten on both axes by a 4-bit one, and if not, why not?")

# ---- 7 ------------------------------------------------------------------------------------------------
with tabs[6]:
    st.markdown("Pruned past 80% and quantized, a network without training is broken: each layer's output is a "
                "little off, the next layer amplifies it, and by the end the logits are noise. Recovery repairs it "
                "in seconds, with a few hundred training images and no gradient steps: **bn** re-estimates the "
                "batch-norm statistics; **lsq** refits each layer's kept weights by least squares so that its output "
                "matches the dense network's on the same images (AdaPrune, Hubara et al. 2021); **obc** also picks "
                "which weights to keep and rounds them to the grid with error feedback (Optimal Brain Compression, "
                "Frantar et al. 2022). Here the whole ResNet-20 is pruned by global magnitude, activations 8 bits.")
    cols = st.columns(2)
    r_sparsity = cols[0].select_slider("Sparsity", (0.8, 0.9, 0.95, 0.98), value=0.9, format_func=lambda s: f"{s:.0%}",
                                       key="l7_sparsity")
    r_bits = cols[1].select_slider("Weight bits", (2, 4, 8), value=4, key="l7_bits")
    if st.button("Compress and repair with each method", key="l7_run",
                 help="four compressions of ResNet-20, each recovered with 128 training images: seconds each") \
            or st.session_state.get("l7_ready"):
        st.session_state["l7_ready"] = True
        with st.spinner("Compressing and recovering with each method (a few seconds each)..."):
            try:
                lesson = course.recovery(r_sparsity, r_bits)
            except JPQError as exc:
                show_error(exc)
                st.stop()
        table = lesson["methods"]
        cols = st.columns(len(table) + 1)
        cols[0].metric("Dense", f"{lesson['dense']['top1']:.1%}", help=f"top-1 on {HELD_OUT} held-out digits")
        for col, row in zip(cols[1:], table.itertuples()):
            col.metric(f"top-1, {row.method}", f"{row.top1:.1%}", delta=f"{row.top1 - lesson['dense']['top1']:+.1%}",
                       help=f"loss {row.loss:.3f}; recovery took {row.recovery_s:.2f} s of {row.total_s:.2f} s in all "
                            "(measured now, on this server)")
        st.plotly_chart(layer_error_figure(lesson["layer_error"]), width="stretch", key="l7_figure")
    try_this("at 90% and 4 bits, follow the 'none' line: the error grows layer by layer. Which method keeps it "
             "smallest at the last layer, and does that one also have the best top-1? Then try 98%: where does "
             "even the best method stop being enough (the point where fine-tuning becomes necessary)?")
