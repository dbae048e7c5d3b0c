"""Running third-party decoders on untrusted bytes: whatever they raise becomes a JPQError naming the file.

numpy's header parser, Pillow, OpenCV, zipfile, torch.load, safetensors and json each raise their own
types on damaged input, and not only the documented ones: numpy's header parser raises
`tokenize.TokenError`, zipfile `NotImplementedError("zip file version ...")`, absurd headers
`MemoryError` or `OverflowError`, deep nesting `RecursionError` (issue 22 found the first two with a
fuzzer). A list of expected types per call site lets the next unlisted one escape as a stack trace, so
every loader runs its decoder calls inside `decoding(...)`, which turns any `Exception` into a `JPQError`
that names the file, says what it should have been and what to do.

Only decoder calls go inside it: a bug in our own code must still surface as itself. Interrupts
(KeyboardInterrupt, SystemExit) are not Exceptions and pass through unchanged.

    with decoding(path, "not a readable checkpoint", "give a .safetensors file ..."):  # raises "PATH: not a readable checkpoint (WHY); give ..."
        state = load_file(path)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from jpq_core.errors import JPQError


def cause(exc: BaseException, limit: int = 160) -> str:
    """The decoder's own words: the first line of its message, shortened; its type when it has none
    (a MemoryError or an AssertionError often says nothing)."""
    words = str(exc)
    if words.startswith("(") and exc.args and isinstance(exc.args[0], str):  # ('EOF in multi-line statement', (2, 0))
        words = exc.args[0]
    text = next((line.strip() for line in words.splitlines() if line.strip()), "")
    return (text or type(exc).__name__)[:limit]


@contextmanager
def decoding(label, problem: str, advice: str, describe=cause):
    """Inside: any Exception becomes JPQError("{label}: {problem} ({describe(exc)}); {advice}").

    The decoders' own warnings are silenced: the JPQError says what matters once, in the user's words.
    A JPQError raised inside (a check of ours between decoder calls) passes through unchanged.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except JPQError:
        raise
    except Exception as exc:  # noqa: BLE001 - the point of this module: any decoder failure is the file's fault
        raise JPQError(f"{label}: {problem} ({describe(exc)}); {advice}") from None
