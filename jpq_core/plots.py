"""Plotly figures the app shows; pure functions of arrays, so they are testable without Streamlit."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# Perceptually uniform and readable in grey print: far = dark, near = bright.
DISPARITY_SCALE = "Viridis"
ERROR_SCALE = "Inferno"


def _image_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=0, r=0, t=40, b=0))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return fig


def rgb_figure(img: np.ndarray, title: str, height: int = 320) -> go.Figure:
    """An RGB image in [0, 1]."""
    fig = go.Figure(go.Image(z=(np.clip(img, 0, 1) * 255).astype(np.uint8)))
    return _image_layout(fig, title, height)


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
