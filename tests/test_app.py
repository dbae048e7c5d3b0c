"""The app as a user sees it, driven by Streamlit's AppTest."""

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import jpq_core.models as models


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def _metrics(at):
    return {m.label: m.value for m in at.metric}


def test_landing_page_shows_network_beside_sgbm_on_middlebury(root):
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
    assert not at.exception
    metrics = _metrics(at)
    assert {"Network bad-3", "SGBM bad-3", "Network EPE", "SGBM EPE", "Network time"} <= set(metrics)
    assert "middlebury-motorcycle" in at.subheader[0].value
    net, sgbm = (float(metrics[k].rstrip("%")) for k in ("Network bad-3", "SGBM bad-3"))
    assert net < sgbm


def test_switching_to_a_synthetic_scene_changes_the_numbers(root):
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
    before = _metrics(at)["Network bad-3"]
    at.sidebar.radio(key="source").set_value("Synthetic scene").run()
    assert not at.exception
    assert "synthetic-" in at.subheader[0].value
    assert _metrics(at)["Network bad-3"] != before


def test_missing_checkpoint_is_explained_not_a_traceback(root, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHED_RUNS", tmp_path)
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert "train one with `python -m jpq_core train stereo`" in at.error[0].value


def test_classifier_page_reports_accuracy_and_confusion(root):
    at = AppTest.from_file(str(root / "pages" / "1_Classifier.py"), default_timeout=120).run()
    assert not at.exception
    metrics = _metrics(at)
    assert float(metrics["Top-1 accuracy"].rstrip("%")) >= 97.0
    assert metrics["Test images"] == "540"
