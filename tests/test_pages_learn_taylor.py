"""The Taylor-scores and Learn pages as a user drives them (Streamlit's AppTest, ResNet-20)."""

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from jpq_core import analysis
from app_support.ui import cached_network, cached_task

TIMEOUT = 240


def _figure(at, key: str) -> dict:
    charts = [c for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    assert charts, f"no figure {key}"
    return json.loads(charts[0].proto.spec)


def _array(value) -> np.ndarray:
    """A plotly JSON array, plain or typed ({"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return a.reshape([int(s) for s in str(shape).split(",")]) if shape else a
    return np.asarray(value)


WIDGETS = ("selectbox", "multiselect", "select_slider", "slider", "radio", "checkbox", "toggle", "button", "number_input")


def _widget_keys(at) -> set:
    """The user keys of every widget on the page (`at.get` returns a list per element type, never None)."""
    return {w.key for kind in WIDGETS for w in at.get(kind) if getattr(w, "key", None)}


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def _number(text: str) -> float:
    return float(text.replace("%", "").replace(" dB", "").split()[0])


@pytest.fixture
def taylor(root, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis, "SENSITIVITY_DIR", tmp_path)  # no scan from earlier runs on this machine
    at = AppTest.from_file(str(root / "pages" / "2_Taylor_scores.py"), default_timeout=TIMEOUT)
    at.query_params["network"] = "resnet20"  # a shared link's network is the page's default
    return at


def test_taylor_page_compares_two_criteria(taylor):
    at = taylor.run()
    assert not at.exception
    missing = {"network", "criteria", "sparsity", "allocation", "mask_layer", "mask_a", "mask_b", "scan_criterion",
               "scan_grid"} - _widget_keys(at)
    assert not missing, f"widgets missing: {sorted(missing)}"
    assert at.selectbox(key="network").value == "resnet20"
    metrics = _metrics(at)
    iou, rho = _number(metrics["IoU, magnitude vs taylor"]), _number(metrics["Spearman, magnitude vs taylor"])
    assert 0.0 < iou < 1.0 and 0.0 < rho < 1.0
    boxes = _figure(at, "dist_figure")["data"]
    assert [b["name"] for b in boxes] == ["magnitude", "taylor"] and len(boxes[0]["x"]) == 22  # ResNet-20's layers
    assert at.button(key="run_scan").label == "Run the scan"  # nothing cached: offered, not run


def test_more_sparsity_removes_more_of_the_layer_and_leaves_the_ranking_alone(taylor):
    at = taylor.run()
    at.select_slider(key="sparsity").set_value(0.5).run()
    removed_before = int((_array(_figure(at, "mask_figure")["data"][0]["z"]) == 0).sum())
    rho_before = _metrics(at)["Spearman, magnitude vs taylor"]
    at.select_slider(key="sparsity").set_value(0.95).run()
    assert not at.exception
    removed_after = int((_array(_figure(at, "mask_figure")["data"][0]["z"]) == 0).sum())
    assert removed_after > removed_before
    assert _metrics(at)["Spearman, magnitude vs taylor"] == rho_before  # ranks do not depend on the threshold

    at.select_slider(key="sparsity").set_value(0.999).run()  # more than the dense first and last layers allow
    assert not at.exception and "protect fewer layers" in at.error[0].value
    at.checkbox(key="protect").uncheck().run()
    assert not at.exception and not at.error
    assert int((_array(_figure(at, "mask_figure")["data"][0]["z"]) == 0).sum()) > removed_after


def test_a_cached_sensitivity_scan_is_drawn_without_running(taylor, tmp_path):
    model, task = cached_network("resnet20"), cached_task("resnet20")
    layers = list(analysis.layer_sizes(model))
    grid = analysis.QUICK_SCAN_SPARSITIES
    scan = {"sparsities": list(grid), "dense": {"top1": 1.0}, "metric": "top1", "criterion": "magnitude", "seconds": 61.0,
            "layers": {k: [0.0, 0.0, 0.01, 0.2] for k in layers}}
    path = analysis._scan_path(model, analysis.QuickEvaluation(task), "magnitude", grid, tmp_path)
    path.write_text(json.dumps(scan))
    at = taylor.run()
    assert not at.exception
    lines = _figure(at, "sens_figure")["data"]
    assert len(lines) == len(layers)
    assert any("read from the disk cache" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == "run_scan"]


@pytest.fixture
def learn(root):
    return AppTest.from_file(str(root / "pages" / "6_Learn.py"), default_timeout=TIMEOUT)


def test_learn_page_has_seven_lessons_each_with_a_thing_to_try(learn):
    at = learn.run()
    assert not at.exception
    assert len(at.tabs) == 7
    assert sum(box.value.startswith("**Try this:**") for box in at.info) == 7
    assert at.button(key="l6_run") is not None
    metrics = _metrics(at)
    assert _number(metrics["Loss, taylor-pruned"]) > _number(metrics["Loss, dense"])


def test_learn_sliders_move_the_numbers_the_right_way(learn):
    at = learn.run()
    at.slider(key="l1_sparsity").set_value(0.3).run()
    low = _metrics(at)
    at.slider(key="l1_sparsity").set_value(0.9).run()
    high = _metrics(at)
    for name in ("magnitude", "taylor"):
        assert _number(high[f"Loss, {name}-pruned"]) > _number(low[f"Loss, {name}-pruned"])

    at.select_slider(key="l2_bits").set_value(3).run()
    coarse = _metrics(at)
    at.select_slider(key="l2_bits").set_value(8).run()
    fine = _metrics(at)
    assert _number(fine["SQNR"]) > _number(coarse["SQNR"]) + 25  # five more bits, ~6 dB each
    assert _number(fine["RMS rounding error"]) < _number(coarse["RMS rounding error"])

    before = _number(_metrics(at)["BOPs"])
    at.select_slider(key="l5_sparsity").set_value(0.98).run()
    assert _number(_metrics(at)["BOPs"]) < before
    assert not at.exception


def test_without_a_zero_point_pruned_weights_come_back(learn):
    at = learn.run()
    table = at.dataframe[0].value.set_index("grid")
    assert table.loc["no zero point", "non-zero weights"] == 1.0
    assert table.loc["exact zero", "non-zero weights"] < 0.55  # 50% pruned, first and last layers dense
    assert table.loc["no zero point", "weight memory (KiB)"] > table.loc["exact zero", "weight memory (KiB)"]


def test_the_recovery_lesson_repairs_the_network_it_shows_broken(learn):
    at = learn.run()
    assert "top-1, none" not in _metrics(at)  # computed on request only: four recoveries take seconds
    at.button(key="l7_run").click().run()
    assert not at.exception
    metrics = _metrics(at)
    assert _number(metrics["top-1, none"]) < 30  # 90% sparse, 4-bit, no training: near guessing
    assert _number(metrics["top-1, obc+bn"]) > 90
