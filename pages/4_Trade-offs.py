"""Trade-offs: measured accuracy against memory, BOPs, energy and latency, from the sweeps in `cached_runs/`."""

from __future__ import annotations

import streamlit as st

from app_support.ui import cached_results, ensure_scores, live_result, set_config, show_error, sidebar_config
from jpq_core.models import is_shipped, network_label
from jpq_core.errors import JPQError
from jpq_core.live import config_from_row
from jpq_core.plots import pareto_plot
from jpq_core.report import RUN_KINDS, finetuning_label, pareto_front, run_kind

st.set_page_config(page_title="Trade-offs - JPQ Explorer", layout="wide")
st.title("Trade-offs")
st.caption("Every point is one measured run from the sweeps shipped in `cached_runs/results/` (fine-tuned or not, as "
           "its hover says). The dotted line is the Pareto front: no run is both smaller and more accurate. The star "
           "is the sidebar's live configuration (no fine-tuning). Select a point to open it in Explore.")

config = sidebar_config()
results, problems = cached_results()
for problem in problems:
    st.warning(f"{problem} The other rows are shown; rerun the sweep to redo that configuration.")
if results.empty:
    st.info("No results yet. Run a sweep: `python -m jpq_core sweep configs/resnet20-tradeoffs.toml`.")
    st.stop()

AXES = {"memory_ratio": "weight memory (share of dense fp32)", "bops_ratio": "BOPs (share of dense)",
        "energy_ratio": "energy, estimate (share of dense)", "hardware_cost_ratio": "hardware cost, estimate (share of dense)",
        "engine_ms": "measured engine latency (ms)"}
networks = sorted(results["network"].unique())
if config.network not in networks:
    st.info(f"No measured runs of {network_label(config.network)} yet, so no star for the sidebar's configuration. A "
            "sweep without fine-tuning takes seconds per configuration: `python -m jpq_core sweep --one "
            f"network={config.network} criterion={config.criterion} \"sparsity=[0.5,0.9,0.95,0.99]\" finetune=none`.")
cols = st.columns(4)
network = cols[0].selectbox("Network", networks, index=networks.index(config.network) if config.network in networks else 0, key="to_network")
x = cols[1].selectbox("Cost axis", [a for a in AXES if results[a].notna().any()], format_func=AXES.get, key="to_x")
colour = cols[2].selectbox("One trace per", ["criterion", "pipeline", "wbits_label", "finetune", "recovery", "granularity"],
                           key="to_colour")
tuned = cols[3].radio("Runs", ["all", *RUN_KINDS], horizontal=True, key="to_tuned",
                      help="Fine-tuned: trained after compression. Recovered: repaired in one shot on calibration data, no "
                           "training (docs/recovery.md). Raw: neither, what pruning and quantization alone do.")

rows = results[(results["network"] == network) & results[x].notna() & results["headline"].notna()]
if tuned != "all":
    rows = rows[run_kind(rows) == tuned]
if rows.empty:
    st.info("No measured runs for this choice; pick another network, axis or set of runs.")
    st.stop()
metric = rows["metric"].iloc[0]
if not is_shipped(network):
    st.warning(f"The runs of {network_label(network)} are of its random weights (sweeps load no weights for "
               "torchvision's architectures): the cost axis is real, the accuracy axis is chance.", icon="⚠️")
higher = metric == "top1"
front = pareto_front(rows, x, "headline", x_lower_is_better=True, y_lower_is_better=not higher)

current = None
if config.network == network and x != "engine_ms":
    try:
        ensure_scores(config)
        live = live_result(config)
        current = {"x": live.cost[x], "y": live.evaluation.metrics[metric],
                   "label": f"{config.criterion} {config.sparsity:.1%}, {config.wbits or 'float'}/{config.abits or 'float'} bits"}
    except JPQError as exc:
        show_error(exc)

label = {"bad3": "Middlebury bad-3 (lower is better)", "top1": "digits top-1 (higher is better)"}[metric]
event = st.plotly_chart(pareto_plot(rows, x, "headline", colour, front, current, AXES[x], label, log_x=x != "engine_ms"),
                        width="stretch", on_select="rerun", selection_mode="points", key="to_plot")
st.caption(f"{len(rows)} runs, {len(front)} on the front. Energy and hardware cost are estimates from the 45 nm "
           "model in docs/costs.md; memory and BOPs are counted; latency is measured by the engine.")

points = event.selection.points if event and event.selection else []
if points:
    run_id = points[0]["customdata"][-1]
    picked = rows[rows["id"] == run_id].iloc[0]
    row = picked.to_dict()
    chosen, differences = config_from_row(row)
    st.write(f"Selected: **{row['criterion']}**, sparsity {row['sparsity']:.1%}, {row['wbits_label']}/{row['abits_label']} "
             f"bits, {row['pipeline']}, fine-tuning: {finetuning_label(picked)}: "
             f"{metric} {row['headline']:.3f}.")
    for note in differences:
        st.caption(note)
    if st.button("Open in Explore", key="to_open"):
        set_config(chosen)
        st.switch_page("app.py")

with st.expander("The front as a table"):
    shown = front.assign(finetuning=[finetuning_label(r) for _, r in front.iterrows()])
    st.dataframe(shown[["criterion", "granularity", "sparsity", "wbits_label", "abits_label", "pipeline", "finetuning",
                        "headline", x]], hide_index=True, width="stretch")
