"""Engine: the live configuration compiled to a packed sparse integer program, run on numba kernels, and timed
against dense PyTorch and PyTorch's sparse path on this machine."""

from __future__ import annotations

import os

import pandas as pd
import plotly.express as px
import streamlit as st

from app_support.ui import ensure_scores, live_network, live_result, show_error, sidebar_config, untrained_notice
from jpq_core.errors import JPQError
from jpq_core.live import engine_comparison, engine_inputs

st.set_page_config(page_title="Engine - JPQ Explorer", layout="wide")
st.title("Engine")
st.caption("Does the compressed network actually run faster? The sidebar's configuration is compiled into a program "
           "(weights packed sparse at their bit width, batch norm folded, int32 accumulation, requantization between "
           "layers) and run by numba kernels. Dense PyTorch and PyTorch's own sparse path (CSR weight x unfolded "
           "input) run the same network with the same thread count; times are medians of interleaved runs. "
           "Optionally ONNX Runtime runs the network's ONNX export too, in float and after its own int8 static "
           "quantization (docs/engine.md, 'Peers').")

config = sidebar_config()
untrained_notice(config, "Here the engine's time and its agreement with PyTorch hold; the outputs themselves are random. ")
cols = st.columns(4)
threads = cols[0].slider("Threads", 1, os.cpu_count() or 1, os.cpu_count() or 1, key="en_threads")
batch = cols[1].select_slider("Batch (classifiers)", [1, 8, 64], value=1, key="en_batch",
                              disabled=config.network == "stereo")
repeats = cols[2].slider("Repetitions", 3, 15, 5, key="en_repeats")
peers = cols[3].checkbox("Also time ONNX Runtime", value=False, key="en_peers",
                         help="exports the network to ONNX (checked against PyTorch) and times ONNX Runtime fp32 and int8 "
                              "static quantization with the same threads; adds tens of seconds")

key = (config, threads, batch, repeats, peers)
if st.button("Compile, run and time", type="primary", key="en_run"):
    try:
        ensure_scores(config)
        result = live_result(config)
        with st.spinner("Compiling and timing (the first run in a new process compiles the kernels)..."):
            live = live_network(config.network)
            run = engine_comparison(result, engine_inputs(live, batch), threads, repeats,
                                    peers_task=live.task if peers else None)
            run["program_file"] = run["program"].to_bytes()  # once per run, not on every rerun of the page
            st.session_state["engine_run"] = (key, run)
    except JPQError as exc:
        show_error(exc)
        st.stop()

saved = st.session_state.get("engine_run")
if saved is None or saved[0] != key:
    st.info("Press the button to compile the sidebar's configuration and time it on this machine "
            "(a few seconds; longer the first time, while numba compiles its kernels).")
    st.stop()
run = saved[1]

cols = st.columns(5)
cols[0].metric("Engine", f"{run['engine_ms']:.1f} ms", delta=f"{run['speedup']:.2f}x vs dense", delta_color="off")
cols[1].metric("Dense PyTorch", f"{run['dense_ms']:.1f} ms")
cols[2].metric("PyTorch sparse", f"{run['torch_sparse_ms']:.1f} ms", delta=f"{run['torch_sparse_speedup']:.2f}x vs dense",
               delta_color="off")
memory = run["memory"]
cols[3].metric("Packed program", f"{memory['program_bytes'] / 1024:,.1f} KiB",
               delta=f"{memory['ratio']:.1%} of the cost model" if memory["ratio"] else None, delta_color="off",
               help=f"bytes of the packed weights, indices, scales and biases. The comparison leaves out the "
                    f"{memory['folded_bn_bytes'] / 1024:.1f} KiB of folded batch-norm biases, which the cost model's "
                    "weight memory does not count")
cols[4].metric("Largest output difference", f"{run['max_abs_diff']:.3g}",
               help=f"engine against the PyTorch fake-quantized reference; outputs reach {run['output_scale']:.3g}")
peer_columns = [(label, run[key]) for key, label in (("onnxruntime_ms", "ONNX Runtime fp32"),
                                                      ("onnxruntime_int8_ms", "ONNX Runtime int8"))
                if run.get(key) is not None]
if peer_columns:
    cols = st.columns(len(peer_columns) + 1)
    for col, (label, ms) in zip(cols, peer_columns):
        col.metric(label, f"{ms:.1f} ms", delta=f"{ms / run['engine_ms']:.2f}x the engine's time", delta_color="off")
for peer, note in run.get("peer_notes", {}).items():
    st.info(f"{peer} was not timed: {note}")
st.caption(f"{run['threads']} thread(s); compiled in {run['compile_s']:.2f} s. Measured now, on this machine "
           f"({run['machine']}), while other sessions may be using it: the ratios come from the same "
           "interleaved runs, and differ between machines.")

left, right = st.columns(2)
times = pd.DataFrame([{"op": k, "ms": v} for k, v in run["layers_ms"].items()]).sort_values("ms", ascending=False)
left.plotly_chart(px.bar(times, x="op", y="ms", title="Where the engine's time goes (per op, ms)"), width="stretch")
sizes = pd.DataFrame(memory["layers"])
sizes["folded BN KiB"] = sizes.pop("folded_bn_bytes") / 1024
sizes["program KiB"] = sizes.pop("program_bytes") / 1024 - sizes["folded BN KiB"]
sizes["cost model KiB"] = sizes.pop("cost_model_bytes") / 1024
right.plotly_chart(px.bar(sizes.melt(id_vars="layer", value_vars=["program KiB", "cost model KiB", "folded BN KiB"]),
                          x="layer", y="value", color="variable", barmode="group",
                          title="Packed size per layer against the cost model (KiB; folded batch norm apart)"),
                   width="stretch")
st.dataframe(pd.DataFrame(run["layers"]), hide_index=True, width="stretch")

st.download_button("Download the packed program (.jpqe, safetensors)", run["program_file"],
                   file_name=f"{config.network}-{config.criterion}-{config.sparsity}-w{config.wbits}a{config.abits}.jpqe",
                   key="en_download")
st.caption("Load it with `jpq_core.engine.load_program(path).run(...)`: arrays and a JSON op list, nothing executable.")
