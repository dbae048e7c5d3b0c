"""Plotly figures the app shows; pure functions of arrays, so they are testable without Streamlit."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

# Perceptually uniform and readable in grey print: far = dark, near = bright.
DISPARITY_SCALE = "Viridis"
ERROR_SCALE = "Inferno"


def _image_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    # The title sits just above the image and below the top margin, where plotly draws its toolbar: in a
    # narrow column a title at the top would be hidden under the toolbar's buttons.
    fig.update_layout(title=dict(text=title, x=0, xanchor="left", y=1, yref="paper", yanchor="bottom", pad=dict(b=6)),
                      height=height, margin=dict(l=0, r=0, t=64, b=0))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return fig


def rgb_figure(img: np.ndarray, title: str, height: int = 320) -> go.Figure:
    """An RGB image in [0, 1]."""
    fig = go.Figure(go.Image(z=(np.clip(img, 0, 1) * 255).astype(np.uint8)))
    return _image_layout(fig, title, height)


ERROR_LIMIT_PX = 10.0  # colour-bar top of error maps: 3 px (the bad-3 threshold) sits low on the scale


def disparity_limit(ground_truth: np.ndarray | None, fallback: np.ndarray | None = None) -> float:
    """The colour-bar top for disparity maps of one pair: 10% over the largest known ground-truth disparity,
    or over the largest of `fallback` (a predicted map) when there is no ground truth."""
    for disp in (ground_truth, fallback):
        if disp is not None and np.isfinite(disp).any():
            return float(np.nanmax(np.where(np.isfinite(disp), disp, np.nan))) * 1.1
    raise ValueError("no finite disparity to scale the colours by")


def error_map(disparity: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """|disparity - ground truth| where the ground truth is known, NaN (drawn blank) elsewhere."""
    known = np.isfinite(ground_truth)
    return np.where(known, np.abs(disparity - np.where(known, ground_truth, 0.0)), np.nan)


def disparity_figure(disp: np.ndarray, title: str, zmax: float, height: int = 320, error: bool = False) -> go.Figure:
    """A disparity (or error) map with a colour bar in pixels; unknown pixels are left blank."""
    z = np.where(np.isfinite(disp), disp, np.nan).astype(np.float32)
    label = "|error| (px)" if error else "disparity (px)"
    fig = go.Figure(go.Heatmap(
        z=z, zmin=0, zmax=zmax, colorscale=ERROR_SCALE if error else DISPARITY_SCALE,
        colorbar=dict(title=dict(text=label, side="right")),
        hovertemplate="x=%{x} y=%{y}<br>" + label + "=%{z:.1f}<extra></extra>",
    ))
    return _image_layout(fig, title, height)


def confusion_figure(matrix: np.ndarray, labels, title: str = "Confusion matrix") -> go.Figure:
    """Rows: true class, columns: predicted class, counts in the cells."""
    fig = go.Figure(go.Heatmap(
        z=matrix, x=[str(c) for c in labels], y=[str(c) for c in labels], colorscale="Blues",
        text=matrix, texttemplate="%{text}", hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>",
    ))
    fig.update_layout(title=title, height=420, margin=dict(l=0, r=0, t=40, b=0),
                      xaxis_title="predicted", yaxis_title="true")
    fig.update_yaxes(autorange="reversed")
    return fig


# ---- criteria comparison (Taylor-scores page) -------------------------------------------------------

CRITERION_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def score_distribution_figure(distributions: dict, height: int = 420) -> go.Figure:
    """Per-layer box plots of each criterion's positive scores on a log axis, from precomputed quantiles
    (`jpq_core.analysis.score_distribution`): box = quartiles, whiskers = 1st and 99th percentiles."""
    fig = go.Figure()
    for i, (name, df) in enumerate(distributions.items()):
        fig.add_trace(go.Box(
            name=name, x=df["layer"], q1=df["q1"], median=df["median"], q3=df["q3"],
            lowerfence=df["p1"], upperfence=df["p99"], marker_color=CRITERION_COLOURS[i % len(CRITERION_COLOURS)],
            customdata=np.stack([df["zero_share"], df["weights"]], axis=1),
            hovertemplate="%{x}<br>median %{median:.3g}<br>zero scores: %{customdata[0]:.1%} of %{customdata[1]}<extra>" + name + "</extra>",
        ))
    fig.update_layout(boxmode="group", height=height, margin=dict(l=0, r=0, t=40, b=0),
                      title="Score per weight, by layer (box: quartiles, whiskers: 1st-99th percentile)",
                      yaxis=dict(type="log", title="score (log scale)", exponentformat="power"),
                      legend=dict(orientation="h", y=-0.35, x=0, yanchor="top"))
    return fig


def criteria_comparison_figure(table, height: int = 480) -> go.Figure:
    """Per layer and pair of criteria: IoU of the kept weights (top) and Spearman's rho (bottom)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("IoU of kept weights", "Spearman rank correlation of scores"))
    for i, (pair, df) in enumerate(table.groupby("pair", sort=False)):
        colour = CRITERION_COLOURS[i % len(CRITERION_COLOURS)]
        fig.add_trace(go.Bar(x=df["layer"], y=df["iou"], name=pair, marker_color=colour, legendgroup=pair,
                             hovertemplate="%{x}: IoU %{y:.3f}<extra>" + pair + "</extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=df["layer"], y=df["spearman"], name=pair, marker_color=colour, legendgroup=pair,
                             showlegend=False, hovertemplate="%{x}: rho %{y:.3f}<extra>" + pair + "</extra>"), row=2, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(range=[-1, 1], row=2, col=1)
    fig.update_layout(barmode="group", height=height, margin=dict(l=0, r=0, t=40, b=0),
                      legend=dict(orientation="h", y=-0.35, x=0, yanchor="top"))
    return fig


AGREEMENT_LABELS = ("removed by both", "kept by {a} only", "kept by {b} only", "kept by both")
AGREEMENT_COLOURS = ("#f0f0f0", "#1f77b4", "#d62728", "#252525")


def mask_agreement_figure(grid: np.ndarray, a: str, b: str, kernel: tuple, title: str, height: int = 420) -> go.Figure:
    """A layer's weights as out-channel rows x (in-channel, ky, kx) columns, coloured by which criterion keeps
    them (`jpq_core.analysis.agreement_grid`); thin lines separate the kernels (`kernel` = (kh, kw))."""
    span = int(np.prod(kernel))
    labels = [t.format(a=a, b=b) for t in AGREEMENT_LABELS]
    scale = [[v, c] for i, c in enumerate(AGREEMENT_COLOURS) for v in (i / 4, (i + 1) / 4)]
    fig = go.Figure(go.Heatmap(
        z=grid, zmin=-0.5, zmax=3.5, colorscale=scale, text=np.array(labels, dtype=object)[grid],
        colorbar=dict(tickvals=[0, 1, 2, 3], ticktext=labels),
        hovertemplate="out %{y}, column %{x}: %{text}<extra></extra>",
    ))
    lines = []
    if span > 1 and grid.shape[1] <= 64 * span:  # one shapes list: add_vline per line is slow
        lines = [dict(type="line", xref="x", yref="paper", x0=x - 0.5, x1=x - 0.5, y0=0, y1=1,
                      line=dict(width=0.5, color="#bbbbbb")) for x in range(span, grid.shape[1], span)]
    fig.update_layout(shapes=lines, title=title, height=height, margin=dict(l=0, r=0, t=40, b=0),
                      xaxis_title=f"input channel x {kernel[0]}x{kernel[1]} kernel position" if span > 1 else "input",
                      yaxis_title="output channel")
    fig.update_yaxes(autorange="reversed")
    return fig


def sensitivity_figure(frame, metric: str, height: int = 420) -> go.Figure:
    """One line per layer: how much worse than dense the network gets when only that layer is pruned."""
    fig = go.Figure()
    for layer, df in frame.groupby("layer", sort=False):
        fig.add_trace(go.Scatter(x=df["sparsity"], y=df["loss"], name=layer, mode="lines+markers",
                                 hovertemplate=layer + ": sparsity %{x:.0%}, %{y:.3f}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=40, b=0),
                      title="Layer sensitivity: each layer pruned alone, no fine-tuning",
                      xaxis=dict(title="sparsity of that layer", tickformat=".0%"), yaxis_title=metric)
    return fig


# ---- per-layer cost (Explore page) -----------------------------------------------------------------------

def layer_cost_figure(layers, height: int = 360) -> go.Figure:
    """Per layer: share of weights kept (bars) and weight memory against the layer's dense float32 memory."""
    names = [layer["name"] for layer in layers]
    kept = [1.0 - layer["sparsity"] for layer in layers]
    memory = [layer["weight_bits"] / (32.0 * layer["weights"]) for layer in layers]
    fig = go.Figure([
        go.Bar(name="weights kept", x=names, y=kept, hovertemplate="%{x}: %{y:.2%} of weights kept<extra></extra>"),
        go.Bar(name="memory vs dense fp32", x=names, y=memory,
               customdata=[[layer["wbits"], layer["encoding"]] for layer in layers],
               hovertemplate="%{x}: %{y:.2%} of dense memory<br>%{customdata[0]}-bit weights, %{customdata[1]}<extra></extra>"),
    ])
    fig.update_layout(barmode="group", height=height, margin=dict(l=0, r=0, t=40, b=0),
                      title="Per layer: weights kept and weight memory (incl. index overhead), share of dense",
                      yaxis=dict(type="log", title="share of dense (log)", tickformat=".1%"),
                      legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


# ---- Learn page ------------------------------------------------------------------------------------


def _lesson_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=0, r=0, t=40, b=0),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def criteria_scatter_figure(x: np.ndarray, y: np.ndarray, category: np.ndarray, a: str, b: str,
                            title: str, height: int = 400) -> go.Figure:
    """Each weight at (score by a, score by b), log-log, coloured like `mask_agreement_figure`."""
    fig = go.Figure()
    labels = [t.format(a=a, b=b) for t in AGREEMENT_LABELS]
    for k in range(4):
        sel = category == k
        fig.add_trace(go.Scattergl(x=x[sel], y=y[sel], mode="markers", name=labels[k],
                                   marker=dict(size=5, color=AGREEMENT_COLOURS[k] if k else "#bdbdbd",
                                               line=dict(width=0.3, color="#555555"))))
    fig.update_xaxes(type="log", title=f"{a} score", exponentformat="power")
    fig.update_yaxes(type="log", title=f"{b} score", exponentformat="power")
    return _lesson_layout(fig, title, height)


def quantization_figure(weight: np.ndarray, error: np.ndarray, levels: np.ndarray, title: str, height: int = 440) -> go.Figure:
    """Top: the weight histogram with the quantization grid's levels as lines. Bottom: the rounding error."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.22, row_heights=[0.65, 0.35],
                        subplot_titles=("weights and the grid levels", "rounding error w_hat - w"))
    fig.add_trace(go.Histogram(x=weight, nbinsx=120, name="weights", marker_color="#1f77b4"), row=1, col=1)
    if len(levels) <= 64:
        fig.update_layout(shapes=[dict(type="line", xref="x", yref="y domain", x0=v, x1=v, y0=0, y1=1,
                                       line=dict(width=1, color="#d62728")) for v in levels])
    fig.add_trace(go.Histogram(x=error, nbinsx=80, name="rounding error", marker_color="#ff7f0e"), row=2, col=1)
    fig.update_layout(showlegend=False)
    return _lesson_layout(fig, title, height)


def zero_value_figure(values: dict, title: str, height: int = 320) -> go.Figure:
    """Per layer: what a pruned (zero) weight comes back as on a grid without an integer zero point."""
    fig = go.Figure(go.Bar(x=list(values), y=list(values.values()), marker_color="#d62728",
                           hovertemplate="%{x}: 0 becomes %{y:.3g}<extra></extra>"))
    fig.update_yaxes(title="value of a pruned weight", exponentformat="power")
    return _lesson_layout(fig, title, height)


def ste_figure(landscape, trajectory, height: int = 400) -> go.Figure:
    """Left: the loss over w with and without rounding, and where each method's w went. Right: w per step."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss L(w)", "w during training"))
    fig.add_trace(go.Scatter(x=landscape["w"], y=landscape["float"], name="without rounding",
                             line=dict(color="#9e9e9e", dash="dot")), row=1, col=1)
    fig.add_trace(go.Scatter(x=landscape["w"], y=landscape["rounded"], name="with rounding (staircase)",
                             line=dict(color="#1f77b4")), row=1, col=1)
    colours = {"true gradient": "#d62728", "straight-through": "#2ca02c"}
    for method, df in trajectory.groupby("method", sort=False):
        fig.add_trace(go.Scatter(x=df["w"], y=df["loss"], mode="markers", name=f"{method}: visited w",
                                 marker=dict(color=colours.get(method), size=6, opacity=0.6)), row=1, col=1)
        fig.add_trace(go.Scatter(x=df["iteration"], y=df["w"], mode="lines+markers", name=method,
                                 line=dict(color=colours.get(method)), showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="w", row=1, col=1)
    fig.update_xaxes(title_text="iteration", row=1, col=2)
    return _lesson_layout(fig, "", height)


def memory_lesson_figure(table, chosen: tuple | None = None, height: int = 420) -> go.Figure:
    """Weight memory (ratio to dense float32, log axis) over sparsity, one line per bit width: solid = cost
    model (with the index bits of the sparse encodings), dotted = (1 - s) * b / 32 with no index at all."""
    fig = go.Figure()
    for i, (bits, df) in enumerate(table.groupby("wbits", sort=True)):
        colour = CRITERION_COLOURS[i % len(CRITERION_COLOURS)]
        label = "float32" if bits >= 32 else f"{bits} bit"
        fig.add_trace(go.Scatter(x=df["sparsity"], y=df["memory_ratio"], name=label, line=dict(color=colour),
                                 customdata=df["encoding"], legendgroup=label,
                                 hovertemplate=label + ", sparsity %{x:.1%}: %{y:.2%} of dense (%{customdata})<extra></extra>"))
        fig.add_trace(go.Scatter(x=df["sparsity"], y=df["ideal_ratio"], name=f"{label}, no index", showlegend=False,
                                 line=dict(color=colour, dash="dot"), legendgroup=label,
                                 hovertemplate=label + " without index bits: %{y:.2%}<extra></extra>"))
    if chosen is not None:
        fig.add_trace(go.Scatter(x=[chosen[0]], y=[chosen[1]], mode="markers", name="your choice",
                                 marker=dict(size=14, symbol="star", color="black")))
    fig.update_xaxes(title="sparsity", tickformat=".0%")
    fig.update_yaxes(type="log", title="weight memory / dense float32", tickformat=".3~%")
    return _lesson_layout(fig, "Memory of one layer: solid = cost model, dotted = no index bits", height)


def layer_error_figure(layer_error: dict, height: int = 420) -> go.Figure:
    """Relative output error of every layer against the dense network (log axis), one line per recovery
    method: `layer_error` is method -> layer -> ||y - y_dense|| / ||y_dense||."""
    fig = go.Figure()
    for i, (method, errors) in enumerate(layer_error.items()):
        fig.add_trace(go.Scatter(x=list(errors), y=list(errors.values()), name=method, mode="lines+markers",
                                 line=dict(color=CRITERION_COLOURS[i % len(CRITERION_COLOURS)]),
                                 hovertemplate=method + ", %{x}: %{y:.1%}<extra></extra>"))
    fig.update_xaxes(title="layer, in forward order", showticklabels=False)
    fig.update_yaxes(type="log", title="output error / dense output", tickformat=".0%")
    return _lesson_layout(fig, "How far each layer's output is from the dense network's", height)

def pareto_lesson_figure(table, x: str, y: str, x_title: str, y_title: str, selected: int | None = None,
                         height: int = 420) -> go.Figure:
    """Points of `table` (columns x, y, "front", "label"), the Pareto front joined by a line."""
    fig = go.Figure()
    rest, front = table[~table["front"]], table[table["front"]].sort_values(x)
    fig.add_trace(go.Scatter(x=rest[x], y=rest[y], mode="markers", name="dominated", text=rest["label"],
                             marker=dict(size=9, color="#9e9e9e"), hovertemplate="%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto front", text=front["label"],
                             line=dict(shape="hv", color="#d62728"), marker=dict(size=10, color="#d62728"),
                             hovertemplate="%{text}<extra></extra>"))
    if selected is not None:
        row = table.iloc[selected]
        fig.add_trace(go.Scatter(x=[row[x]], y=[row[y]], mode="markers", name="selected", text=[row["label"]],
                                 marker=dict(size=18, symbol="circle-open", line=dict(width=3, color="black")),
                                 hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(type="log", title=x_title, tickformat=".1%")
    fig.update_yaxes(title=y_title)
    return _lesson_layout(fig, "", height)


# ---- trade-offs (Trade-offs page) --------------------------------------------------------------------------

HOVER_FIELDS = ("criterion", "granularity", "sparsity", "wbits_label", "abits_label", "pipeline", "finetune", "budget", "id")


def pareto_plot(df, x: str, y: str, colour: str, front, current: dict | None = None, x_title: str = "", y_title: str = "",
                log_x: bool = True, height: int = 520) -> go.Figure:
    """Measured configurations (one trace per value of `colour`), the Pareto front as a line, and the live
    configuration as a star. Each point carries its row id in customdata[-1], so a selection finds the row."""
    fig = go.Figure()
    for i, (value, group) in enumerate(df.groupby(colour, sort=True, dropna=False)):
        custom = group[list(HOVER_FIELDS)].astype(str).to_numpy()
        fig.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="markers", name=f"{colour}: {value}", customdata=custom,
            marker=dict(size=9, color=qualitative.D3[i % len(qualitative.D3)],
                        symbol=["circle", "square", "diamond", "triangle-up", "x", "cross", "star-triangle-up"][i % 7]),
            hovertemplate=("%{customdata[0]} (%{customdata[1]}), sparsity %{customdata[2]}, %{customdata[3]}/%{customdata[4]} bits"
                           "<br>%{customdata[5]}, fine-tuning %{customdata[6]} (%{customdata[7]} steps)"
                           f"<br>{x_title or x}: %{{x:.3g}}<br>{y_title or y}: %{{y:.3g}}<extra></extra>"),
        ))
    if len(front):
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front", hoverinfo="skip",
                                 line=dict(color="black", dash="dot", shape="hv")))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current["x"]], y=[current["y"]], mode="markers", name="live configuration (no fine-tuning)",
                                 marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1)),
                                 hovertemplate=current.get("label", "") + "<extra>live</extra>"))
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=30, b=0), xaxis_title=x_title or x, yaxis_title=y_title or y,
                      legend=dict(orientation="h", y=-0.15), clickmode="event+select")
    if log_x:
        fig.update_xaxes(type="log")
    return fig
