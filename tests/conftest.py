import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    # numba's pedantic check warns, at every compile, where a function inlined in its IR assigns a name in two
    # blocks (`jpq_core.engine.kernels._inline_if`); users would see it, so a run with a cold cache fails on it
    config.addinivalue_line("filterwarnings", "error::numba.core.errors.NumbaIRAssumptionWarning")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def fuzz():
    """scripts/fuzz.py as a module: the reliability tests share its input generators and checks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jpq_fuzz_script", ROOT / "scripts" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



class _WritesAFile:
    """Unpickling this object opens (creates) `target`: the stand-in for a checkpoint that runs code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def code_running_object():
    """code_running_object(path) -> an object whose unpickling would create `path`."""
    return lambda target: _WritesAFile(str(target))


@pytest.fixture(scope="module")
def digits_task():
    """ResNet-20's task on scikit-learn's digits (the training and test splits in memory)."""
    from jpq_core.tasks import ClassificationTask

    return ClassificationTask("digits")


@pytest.fixture(scope="module")
def resnet20():
    """The shipped ResNet-20 (a fresh copy per test module)."""
    from jpq_core.models import load_network

    return load_network("resnet20")
