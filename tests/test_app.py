"""The app as a user sees it, driven by Streamlit's AppTest: Explore, Depth maps, Classifier."""

import re

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import jpq_core.live as live
import jpq_core.models as models


@pytest.fixture(autouse=True, scope="module")
def fresh_caches():
    """Caches are keyed by configuration, so the tests here share them (each page run stays a real run)."""
    st.cache_data.clear()
    st.cache_resource.clear()
    live._SHARED.clear()  # the shipped networks the process shares between sessions (`shared_live_network`)
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
    live._SHARED.clear()


def _metrics(at):
    return {m.label: m.value for m in at.metric}


def _number(text: str) -> float:
    return float(text.split()[0].rstrip("%").replace(",", ""))


def _explore(root, **query):
    """Explore with `query` in the link. Recovery is off unless the test asks for it: it is tested on its own,
    and recovering at every high sparsity here would double these tests' time."""
    at = AppTest.from_file(str(root / "app.py"), default_timeout=240)  # the router opens Explore
    at.query_params.update({"recovery": "none", **query})
    return at.run()


def test_explore_more_sparsity_means_more_error_and_less_memory(root):
    at = _explore(root, criterion="magnitude", sparsity="0.5")
    assert not at.exception
    before = _metrics(at)
    assert {"bad-3", "EPE", "Weight memory", "BOPs", "Energy (estimate)", "Hardware cost (estimate)"} <= set(before)
    at.sidebar.select_slider(key="w_sparsity").set_value(0.95).run()
    assert not at.exception
    after = _metrics(at)
    assert _number(after["bad-3"]) > _number(before["bad-3"])
    assert _number(after["Weight memory"]) < _number(before["Weight memory"])
    assert _number(after["Sparsity achieved"]) == pytest.approx(95.0, abs=0.01)
    assert at.query_params["sparsity"] in ("0.95", ["0.95"])  # the link carries the configuration


def test_explore_fewer_weight_bits_cut_memory_and_bops(root):
    at = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.5", wbits="8")
    before = _metrics(at)
    assert "Top-1" in before
    at.sidebar.select_slider(key="w_wbits").set_value(4).run()
    after = _metrics(at)
    assert not at.exception
    assert _number(after["Weight memory"]) < _number(before["Weight memory"])
    assert _number(after["BOPs"]) < _number(before["BOPs"])


def test_explore_shows_the_recovered_network_with_the_raw_one_a_click_away(root):
    """At 95% sparsity without training the raw ResNet-20 guesses (top-1 about 10%); Explore recovers it by
    default (auto = obc+bn for classifiers, measured 98%), says so, and the toggle shows the raw network."""
    at = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.95", wbits="4", abits="8", recovery="auto")
    assert not at.exception
    assert _number(_metrics(at)["Top-1"]) > 80
    assert any("Recovered by **obc+bn**" in c.value for c in at.caption)
    at.toggle(key="ex_raw").set_value(True).run()
    assert not at.exception
    assert _number(_metrics(at)["Top-1"]) < 30
    assert at.query_params["recovery"] in ("auto", ["auto"])


def test_explore_uses_the_shipped_recovery_aware_scan_and_names_the_command_where_none_is_saved(root):
    """Stereo, magnitude, w4/a8 at 90% with lsq: the shipped scan (cached_runs/scans/) gives the per-layer
    allocation at once, and the recovered network is far better than the global threshold's (measured 32 against
    41 bad-3, docs/recovery.md). A configuration without a scan says how to make one instead of failing."""
    query = dict(criterion="magnitude", sparsity="0.9", wbits="4", abits="8", recovery="lsq")
    aware = _explore(root, allocation="recovery-aware", **query)
    assert not aware.exception and not aware.error
    bad3 = _number(_metrics(aware)["bad-3"])
    assert _number(_metrics(aware)["Sparsity achieved"]) == pytest.approx(90.0, abs=0.05)
    assert bad3 < _number(_metrics(_explore(root, allocation="global", **query))["bad-3"]) - 3
    missing = _explore(root, network="resnet20", criterion="fisher", sparsity="0.9", wbits="3", abits="8",
                       allocation="recovery-aware")
    assert not missing.exception
    assert "python -m jpq_core compress --network resnet20 --criterion fisher" in missing.error[0].value


def test_explore_lists_the_cached_fine_tuned_runs_of_the_configuration(root):
    at = _explore(root, network="resnet20", criterion="taylor", sparsity="0.95", wbits="4", abits="8")
    assert not at.exception
    runs = at.dataframe[0].value
    assert "masked 200 steps" in set(runs["fine-tuning"])  # the shipped 200-step runs of this configuration
    assert set(runs["pipeline"]) >= {"prune-then-quantize", "quantize-then-prune", "joint"}


def test_a_link_with_a_bad_value_opens_and_says_what_it_ignored(root):
    at = _explore(root, network="resnet20", sparsity="1.5", wbits="5", criterion="magnitude")
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "sparsity='1.5'" in warnings and "wbits='5'" in warnings
    assert _number(_metrics(at)["Sparsity achieved"]) == pytest.approx(50.0, abs=0.01)  # the default


def test_depth_maps_compare_two_settings_with_dense_and_sgbm(root):
    at = AppTest.from_file(str(root / "pages" / "3_Depth_maps.py"), default_timeout=240)
    at.query_params.update(criterion="magnitude", sparsity="0.5")
    at.run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("method")
    assert table.loc["Dense network", "bad-3"] < table.loc["OpenCV SGBM", "bad-3"]
    b_dense = table.filter(like="B:", axis=0)["bad-3"].item()
    assert b_dense == pytest.approx(table.loc["Dense network", "bad-3"], abs=0.01)  # B starts unpruned at 8 bits
    at.select_slider(key="dm_sparsity").set_value(0.95).run()
    table = at.dataframe[0].value.set_index("method")
    assert table.filter(like="B:", axis=0)["bad-3"].item() > b_dense + 0.1


def test_depth_maps_on_a_synthetic_scene(root):
    at = AppTest.from_file(str(root / "pages" / "3_Depth_maps.py"), default_timeout=240).run()
    at.radio(key="dm_source").set_value("Synthetic scene").run()
    assert not at.exception
    assert len(at.dataframe[0].value) == 4


def test_classifier_page_reports_accuracy_and_confusion(root):
    at = AppTest.from_file(str(root / "pages" / "1_Classifier.py"), default_timeout=120).run()
    assert not at.exception
    metrics = _metrics(at)
    assert float(metrics["Top-1 accuracy"].rstrip("%")) >= 97.0
    assert metrics["Test images"] == "540"


# The Engine and Trade-offs pages below take the sidebar's configuration without recovery (as _explore does): the
# engine on a recovered network is tests/test_recovery.py's, and recovering here would only add its seconds.
ENGINE_QUERY = dict(network="resnet20", criterion="magnitude", sparsity="0.9", wbits="8", abits="8", recovery="none")


def test_engine_page_times_the_live_configuration_against_pytorch(root):
    at = AppTest.from_file(str(root / "pages" / "5_Engine.py"), default_timeout=400)
    at.query_params.update(ENGINE_QUERY)
    at.run()
    assert not at.metric  # nothing is timed before the user asks
    at.button(key="en_run").click().run()
    assert not at.exception
    metrics = {m.label: m for m in at.metric}
    assert {"Engine", "Dense PyTorch", "PyTorch sparse", "Packed program"} <= set(metrics)
    assert "x vs dense" in metrics["Engine"].delta
    packed_share = float(metrics["Packed program"].delta.split("%")[0]) / 100
    assert 0.95 < packed_share < 1.3  # measured size near the cost model (folded biases are extra)
    assert at.get("download_button")
    assert any("cores;" in c.value and "Measured now, on this machine" in c.value for c in at.caption)


def test_engine_page_shows_onnx_runtime_when_asked(root):
    at = AppTest.from_file(str(root / "pages" / "5_Engine.py"), default_timeout=400)
    at.query_params.update(ENGINE_QUERY)
    at.run()
    at.checkbox(key="en_peers").check().run()
    at.button(key="en_run").click().run()
    assert not at.exception
    metrics = {m.label: m for m in at.metric}
    assert {"Engine", "ONNX Runtime fp32", "ONNX Runtime int8"} <= set(metrics)
    assert "the engine's time" in metrics["ONNX Runtime fp32"].delta


def test_trade_offs_page_plots_measured_runs_and_the_live_point(root):
    at = AppTest.from_file(str(root / "pages" / "4_Trade-offs.py"), default_timeout=240)
    at.query_params.update(network="resnet20", criterion="magnitude", sparsity="0.5", recovery="none")
    at.run()
    assert not at.exception
    caption = " ".join(c.value for c in at.caption)
    runs, front = (int(x) for x in re.search(r"(\d+) runs, (\d+) on the front", caption).groups())
    assert runs > front > 0
    at.radio(key="to_tuned").set_value("fine-tuned").run()
    assert not at.exception
    caption = " ".join(c.value for c in at.caption)
    tuned = int(re.search(r"(\d+) runs", caption).group(1))
    assert 0 < tuned < runs
    # the front's table says how each run was fine-tuned, budget and recipe included
    labels = list(at.dataframe[0].value["finetuning"])
    assert labels and all(re.fullmatch(r"(masked|distill|distill-cost|regrow) \d+ steps.*", label) for label in labels)
    # recovered runs (one-shot repair, no training) are a set of their own, labelled with their method
    at.radio(key="to_tuned").set_value("recovered").run()
    assert not at.exception
    recovered = int(re.search(r"(\d+) runs", " ".join(c.value for c in at.caption)).group(1))
    assert 0 < recovered < runs
    labels = list(at.dataframe[0].value["finetuning"])
    assert labels and all(re.fullmatch(r"no fine-tuning, .*(obc\+bn|lsq) recovery", label) for label in labels)


def test_uploaded_checkpoints_are_used_or_refused_with_a_reason(root, tmp_path, code_running_object):
    import pickle

    import torch

    from jpq_core.models import load_network

    good, wrong = tmp_path / "mine.pt", tmp_path / "wrong.pt"
    torch.save(load_network("resnet20").state_dict(), good)
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    target = tmp_path / "pwned"
    evil = pickle.dumps({"fc.weight": code_running_object(target)})

    at = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.5")
    uploader = at.sidebar.get("file_uploader")[0]
    uploader.upload("evil.pt", evil).run()
    assert not at.exception and not target.exists()
    assert "never unpickled" in at.error[0].value
    at.sidebar.get("file_uploader")[0].upload("wrong.pt", wrong.read_bytes()).run()
    assert "fc.weight (3, 3) vs (10, 64)" in at.error[0].value
    at.sidebar.get("file_uploader")[0].upload("mine.pt", good.read_bytes()).run()
    assert not at.exception and not at.error
    assert at.query_params["checkpoint"] not in ("", [""])
    assert float(_metrics(at)["Top-1"].rstrip("%")) > 90


def test_an_uploaded_compressed_network_is_a_starting_point_and_said_to_be_one(root):
    shipped = root / "cached_runs" / "results" / "checkpoints" / "98c9abc2b1c8.safetensors"  # ResNet-20, 95% pruned
    at = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.5")
    at.sidebar.get("file_uploader")[0].upload("compressed.safetensors", shipped.read_bytes()).run()
    assert not at.exception and not at.error
    assert "a compressed network with 9" in at.sidebar.success[0].value  # 9x.x% of its weights pruned
    assert at.query_params["checkpoint"] not in ("", [""])


def test_a_damaged_results_file_is_named_and_its_good_rows_still_shown(root, tmp_path, monkeypatch):
    import jpq_core.report as report
    from jpq_core.sweeps import RESULTS

    table = tmp_path / "sweeps.jsonl"
    good = RESULTS.read_text().splitlines()
    table.write_text("\n".join(good) + "\n{\"network\": \"resnet20\", \"trunc")  # a row cut off mid-write
    monkeypatch.setattr(report, "RESULTS", table)
    # The results cache is keyed by the table's path, so this table is read afresh; the other cached data (maps,
    # comparisons) stays, for the tests after this one.
    at = AppTest.from_file(str(root / "pages" / "4_Trade-offs.py"), default_timeout=240)
    at.query_params.update(network="resnet20", criterion="magnitude", recovery="none")
    at.run()
    assert not at.exception
    assert any("sweeps.jsonl" in w.value for w in at.warning)
    expected = len(report.load_results(RESULTS)[0].query("network == 'resnet20'"))
    assert f"{expected} runs" in " ".join(c.value for c in at.caption)


def test_two_sessions_keep_their_own_configuration(root):
    first = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.5")
    second = _explore(root, network="resnet20", criterion="magnitude", sparsity="0.9")
    before = _metrics(second)["Weight memory"]
    first.sidebar.select_slider(key="w_sparsity").set_value(0.95).run()
    second.run()
    assert _metrics(second)["Weight memory"] == before
    assert _number(_metrics(first)["Sparsity achieved"]) == pytest.approx(95.0, abs=0.01)
    assert _number(_metrics(second)["Sparsity achieved"]) == pytest.approx(90.0, abs=0.01)


def _png(height: int, width: int) -> bytes:
    import cv2
    import numpy as np

    ok, data = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    return data.tobytes()


@pytest.mark.parametrize("left, right, message", [
    (lambda: _png(64, 96), lambda: _png(64, 80), "differ in size"),
    (lambda: b"not an image at all", lambda: _png(64, 96), "left.png"),
    (lambda: _png(64, 96)[:40], lambda: _png(64, 96), "left.png"),
])
def test_a_bad_uploaded_pair_gets_a_message_not_a_traceback(root, left, right, message):
    at = AppTest.from_file(str(root / "pages" / "3_Depth_maps.py"), default_timeout=240).run()
    at.radio(key="dm_source").set_value("Your own pair").run()
    uploaders = {u.key: u for u in at.get("file_uploader")}
    uploaders["dm_left"].upload("left.png", left(), "image/png")
    uploaders["dm_right"].upload("right.png", right(), "image/png").run()
    assert not at.exception
    assert message in at.error[0].value


def test_an_uploaded_pair_without_ground_truth_is_shown_without_scores(root):
    at = AppTest.from_file(str(root / "pages" / "3_Depth_maps.py"), default_timeout=240).run()
    at.radio(key="dm_source").set_value("Your own pair").run()
    uploaders = {u.key: u for u in at.get("file_uploader")}
    uploaders["dm_left"].upload("left.png", _png(64, 96), "image/png")
    uploaders["dm_right"].upload("right.png", _png(64, 96), "image/png").run()
    assert not at.exception and not at.error
    assert "No ground truth" in at.info[0].value


def test_explore_says_which_path_computed_it_and_the_engine_takes_over_once_ready(root):
    import time

    from app_support.ui import live_network

    at = _explore(root, criterion="magnitude", sparsity="0.9", wbits="8", abits="8")
    assert not at.exception
    caption = " ".join(c.value for c in at.caption)
    assert "Dense PyTorch on the same input" in caption
    assert len(at.get("image")) >= 4  # left image, dense, compressed and error maps as images, not heatmaps
    engine = live_network("stereo").engine
    deadline = time.time() + 900
    while engine.compiling() and time.time() < deadline:  # the first program's kernels compile in the background
        time.sleep(0.2)
    at.sidebar.select_slider(key="w_sparsity").set_value(0.91).run()
    assert not at.exception
    assert _metrics(at)["Computed by"].startswith("engine")
    assert "sparse integer engine" in " ".join(c.value for c in at.caption)
    at.sidebar.select_slider(key="w_wbits").set_value(16).run()  # 16-bit weights: not an integer configuration
    assert _metrics(at)["Computed by"].startswith("PyTorch")
    assert "not an integer configuration" in " ".join(c.value for c in at.caption)


def test_the_engine_check_fills_in_pytorch_s_numbers_beside_the_engine_s(root):
    import time

    from app_support.ui import live_network

    at = _explore(root, criterion="magnitude", sparsity="0.93", wbits="8", abits="8")
    engine = live_network("stereo").engine
    deadline = time.time() + 900
    while engine.compiling() and time.time() < deadline:
        time.sleep(0.2)
    at.sidebar.select_slider(key="w_sparsity").set_value(0.94).run()
    assert _metrics(at)["Computed by"] == "engine"
    at.toggle(key="ex_check_engine").set_value(True).run()
    assert not at.exception
    check = next(c.value for c in at.caption if c.value.startswith("PyTorch on the same configuration"))
    pytorch_bad3, engine_bad3 = (float(x) for x in re.search(r"bad3 ([\d.]+) \(engine ([\d.]+)\)", check).groups())
    assert pytorch_bad3 == pytest.approx(engine_bad3, abs=0.005)


def test_missing_checkpoint_is_explained_not_a_traceback(root, tmp_path, monkeypatch):
    """Last in the module: it empties the network caches the tests above share (a run must load the network)."""
    monkeypatch.setattr(models, "CACHED_RUNS", tmp_path)
    live._SHARED.clear()
    st.cache_resource.clear()
    at = _explore(root)
    assert not at.exception
    assert "train one with `python -m jpq_core train stereo`" in at.error[0].value
