"""The command line as a user runs it: JSON out, one-line errors, the shipped networks' quality."""

import json
import subprocess
import sys

import pytest


def run(root, *args):
    return subprocess.run([sys.executable, "-m", "jpq_core", *args], cwd=root, capture_output=True, text=True, timeout=300)


def test_help_lists_every_command(root):
    out = run(root, "--help").stdout
    for command in ("train", "evaluate", "baselines"):
        assert command in out


def test_shipped_stereo_network_beats_sgbm_on_middlebury(root):
    proc = run(root, "evaluate", "--network", "stereo", "--data", "middlebury", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["network"] == "stereo" and result["data"] == "middlebury"
    metrics = result["metrics"]
    assert {"epe", "bad2", "bad3"} <= set(metrics)
    baselines = json.loads(run(root, "baselines", "--json").stdout)["baselines"]
    assert metrics["bad3"] < baselines["sgbm"]["bad3"] < baselines["bm"]["bad3"]
    assert metrics["bad3"] < 0.173  # the bar: SGBM's 17.3%


def test_shipped_resnet20_reaches_97_percent_on_digits(root):
    proc = run(root, "evaluate", "--network", "resnet20", "--data", "digits", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metrics"]["top1"] >= 0.97


def test_user_pair_with_ground_truth(root, tmp_path):
    import cv2
    import numpy as np

    from jpq_core.data.synthetic_stereo import make_scene

    s = make_scene(5, 128, 256, 40.0)
    cv2.imwrite(str(tmp_path / "l.png"), (s.left[..., ::-1] * 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "r.png"), (s.right[..., ::-1] * 255).astype(np.uint8))
    np.save(tmp_path / "gt.npy", s.disparity)
    proc = run(root, "evaluate", "--left", str(tmp_path / "l.png"), "--right", str(tmp_path / "r.png"), "--gt", str(tmp_path / "gt.npy"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["data"] == "user-pair" and result["metrics"]["epe"] < 5.0


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x04K\x01."])
def test_bad_checkpoint_is_one_line_error(root, tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    proc = run(root, "evaluate", "--network", "stereo", "--checkpoint", str(bad), "--json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
