"""The quick form of scripts/fuzz.py: every loader family fuzzed by mutating valid files, 0 failures.

The script runs 10,000 inputs per family (figures in docs/reliability.md); the suite runs JPQ_FUZZ_EXAMPLES
(default 40) per family with a seed of its own, so each run of the suite tries new inputs of the same kinds.
"""

import os
import random

import pytest

from jpq_core.errors import JPQError

EXAMPLES = int(os.environ.get("JPQ_FUZZ_EXAMPLES", "40"))


@pytest.mark.parametrize("family", ["images", "ground-truth", "checkpoints", "engine-programs"])
def test_mutated_files_load_or_are_refused_with_jpq_error(fuzz, tmp_path, family):
    seed = random.randrange(2**32)
    tally = fuzz.run([family], EXAMPLES, seed, tmp_path / "failures", progress=False)[fuzz.FAMILIES[family].name]
    assert tally["inputs"] == EXAMPLES
    assert tally.get("failed", 0) == 0, f"seed {seed}: {tally['failures by type']} (inputs saved in {tmp_path / 'failures'})"


def test_the_fuzzer_finds_a_foreign_exception(fuzz, tmp_path, monkeypatch):
    """The harness counts what escapes: a loader raising anything but JPQError is a failure, saved for replay."""
    family = fuzz.FAMILIES["ground-truth"]
    monkeypatch.setattr(family, "load", lambda data, work: (_ for _ in ()).throw(NotImplementedError("escaped")))
    status, exc = fuzz.attempt(family, b"x", tmp_path, 5.0)
    assert status == "failed" and isinstance(exc, NotImplementedError)
    saved = fuzz.save_failure(tmp_path / "failures", family, 7, b"x", "flip@0", exc)
    assert "NotImplementedError: escaped" in saved.read_text()
    monkeypatch.setattr(family, "load", lambda data, work: (_ for _ in ()).throw(JPQError("refused")))
    assert fuzz.attempt(family, b"x", tmp_path, 5.0) == ("refused", None)
