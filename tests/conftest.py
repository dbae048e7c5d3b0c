import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


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
