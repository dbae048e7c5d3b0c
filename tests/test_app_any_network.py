"""The app with a network users bring: a torchvision architecture picked in the sidebar, randomly initialised
or with uploaded weights, on Explore, Taylor scores, Trade-offs and Engine (Streamlit's AppTest)."""

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import jpq_core.live as live
from jpq_core.models import network_label

NETWORK = "tv:mobilenet_v3_small"  # the smallest architecture offered: seconds per page run
QUERY = dict(network=NETWORK, criterion="magnitude", sparsity="0.9", wbits="8", abits="8")


@pytest.fixture(autouse=True, scope="module")
def fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    live._SHARED.clear()  # the shipped networks the process shares between sessions (`shared_live_network`)
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
    live._SHARED.clear()


def _page(root, page: str, **query):
    at = AppTest.from_file(str(root / page), default_timeout=300)
    at.query_params.update(query or QUERY)
    return at.run()


def _warnings(at) -> str:
    return " ".join(w.value for w in at.warning)


def test_explore_offers_torchvision_networks_and_says_random_weights_mean_nothing(root):
    at = _page(root, "app.py")
    assert not at.exception and not at.error
    offered = at.selectbox(key="w_network")
    assert {network_label(n) for n in ("tv:resnet18", "tv:mobilenet_v2", NETWORK)} <= set(offered.options)
    assert offered.value == NETWORK
    assert "Random weights" in _warnings(at) and "accuracy and predictions are meaningless" in _warnings(at)
    metrics = {m.label: m.value for m in at.metric}
    assert "Top-1 (random weights)" in metrics
    assert float(metrics["Weight memory"].split()[0].replace(",", "")) > 0 and "BOPs" in metrics
    assert at.query_params["network"] in (NETWORK, [NETWORK])  # the link keeps the architecture


def test_uploaded_weights_for_a_torchvision_network_are_checked_and_used(root, tmp_path):
    from jpq_core.models import load_network

    mine = tmp_path / "mine.pt"
    model = load_network(NETWORK)
    with torch.no_grad():
        model.classifier[-1].bias.add_(1.0)  # not the random initialisation any more
    torch.save(model.state_dict(), mine)
    at = _page(root, "app.py")
    at.sidebar.get("file_uploader")[0].upload("resnet20.safetensors", (
        root / "cached_runs" / "checkpoints" / "resnet20.safetensors").read_bytes()).run()
    assert not at.exception
    assert "does not fit the MobileNetV3 network" in at.error[0].value and "unexpected: fc.bias" in at.error[0].value
    at.sidebar.get("file_uploader")[0].upload("mine.pt", mine.read_bytes()).run()
    assert not at.exception and not at.error
    assert at.query_params["checkpoint"] not in ("", [""]) and "Random weights" not in _warnings(at)
    assert "Top-1" in {m.label for m in at.metric}


def test_taylor_scores_rank_the_torchvision_network_s_weights(root):
    at = _page(root, "pages/2_Taylor_scores.py")
    assert not at.exception and not at.error
    assert at.selectbox(key="network").value == NETWORK
    assert "Random weights" in _warnings(at) and "at initialisation" in _warnings(at)
    assert len(at.get("plotly_chart")) >= 2  # score distributions, criteria side by side (magnitude and taylor)
    assert any("IoU" in m.label for m in at.metric)
    assert any("nothing to measure" in i.value for i in at.info)  # sensitivity does not apply to random weights


def test_trade_offs_says_how_to_measure_a_network_without_runs(root):
    at = _page(root, "pages/4_Trade-offs.py")
    assert not at.exception and not at.error
    info = " ".join(i.value for i in at.info)
    assert "No measured runs of torchvision mobilenet_v3_small" in info and f"--one network={NETWORK}" in info
    assert at.selectbox(key="to_network").value != NETWORK  # the measured networks are still shown


def test_engine_page_times_a_torchvision_network(root):
    at = _page(root, "pages/5_Engine.py")
    at.button(key="en_run").click().run()
    assert not at.exception and not at.error
    metrics = {m.label: m for m in at.metric}
    assert {"Engine", "Dense PyTorch", "Packed program"} <= set(metrics) and "x vs dense" in metrics["Engine"].delta
    assert "Random weights" in _warnings(at) and "engine's time" in _warnings(at)
