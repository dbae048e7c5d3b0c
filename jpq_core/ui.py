"""Streamlit glue shared by the pages: cached loaders and error display. No science here."""

from __future__ import annotations

import streamlit as st

from jpq_core.data.stereo_files import middlebury_motorcycle
from jpq_core.data.synthetic_stereo import make_scene, scene_seed
from jpq_core.errors import JPQError
from jpq_core.evaluation import stereo_comparison
from jpq_core.models import load_network


def show_error(exc: JPQError) -> None:
    st.error(str(exc))


@st.cache_resource(show_spinner="Loading the stereo network...")
def cached_stereo_network():
    return load_network("stereo")


@st.cache_resource(show_spinner="Loading the classifier...")
def cached_classifier(name: str):
    return load_network(name)


@st.cache_data(show_spinner=False, max_entries=32)
def stereo_sample(source: str, seed: int):
    if source == "Middlebury motorcycle":
        return middlebury_motorcycle()
    return make_scene(scene_seed("validation", seed), 256, 512)


@st.cache_data(show_spinner="Running the network and SGBM...", max_entries=32)
def cached_comparison(source: str, seed: int) -> dict:
    return stereo_comparison(cached_stereo_network(), stereo_sample(source, seed))
