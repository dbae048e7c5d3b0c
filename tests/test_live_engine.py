"""The live view's engine path: when the sparse integer engine computes a configuration, and that it measures
what PyTorch measures (within the quantization tolerance)."""

import pytest

from jpq_core.live import LiveConfig, LiveNetwork
from jpq_core.live_engine import EnginePath, crossover


@pytest.fixture(scope="module")
def stereo_live():
    from jpq_core.models import load_network

    return LiveNetwork("stereo", load_network("stereo"))


def test_the_engine_computes_only_integer_configurations_at_or_above_its_crossover():
    import torch

    path = EnginePath("stereo")
    limit = crossover("stereo", 8, threads=torch.get_num_threads())
    assert limit == 0.5  # measured: cached_runs/results/engine_bench_stereo_b1_t{1,2}.json
    assert path.why_not(8, 8, 0.5) is None and path.why_not(8, 8, 0.99) is None
    assert "crossover" in path.why_not(8, 8, 0.45)
    assert "integer" in path.why_not(None, 8, 0.9)  # float weights
    assert "integer" in path.why_not(8, 16, 0.9)  # 16-bit activations: the engine's float path
    assert "crossover" in path.why_not(3, 8, 0.45)  # a width the benchmark did not measure: the highest crossover
    assert "stereo" in EnginePath("resnet20").why_not(8, 8, 0.9)


def test_engine_and_pytorch_give_the_same_metrics(stereo_live):
    config = LiveConfig(network="stereo", criterion="magnitude", sparsity=0.9, wbits=8, abits=8, recovery="none")
    torch_result = stereo_live.compress(config, engine=False)
    engine_result = stereo_live.compress(config, engine=True)
    assert torch_result.evaluation.path == "PyTorch" and engine_result.evaluation.path == "engine"
    a, b = torch_result.evaluation.metrics, engine_result.evaluation.metrics
    assert b["bad3"] == pytest.approx(a["bad3"], abs=0.005)  # integer rounding moves a few pixels across 3 px
    assert b["epe"] == pytest.approx(a["epe"], rel=0.02)
    assert engine_result.cost == torch_result.cost  # the cost model does not depend on the path


def test_a_program_whose_kernels_are_not_ready_is_answered_by_pytorch_then_by_the_engine(stereo_live):
    import time

    stereo_live.engine = EnginePath("stereo")  # nothing ready in this fresh tracker
    first = stereo_live.compress(LiveConfig(network="stereo", criterion="magnitude", sparsity=0.91, recovery="none"))
    assert first.evaluation.path == "PyTorch" and "background" in first.path_note
    deadline = time.time() + 900
    while stereo_live.engine.compiling() and time.time() < deadline:
        time.sleep(0.1)
    second = stereo_live.compress(LiveConfig(network="stereo", criterion="magnitude", sparsity=0.92, recovery="none"))
    assert second.evaluation.path == "engine" and "crossover" in second.path_note
