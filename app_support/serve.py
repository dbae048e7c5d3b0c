"""Start the dashboard with its heavy imports done before the server listens: `python -m app_support.serve
[streamlit options]` is `streamlit run app.py [options]` in a process that has already imported PyTorch,
numba's engine kernels, pandas and plotly.

Why: Streamlit runs a page's script only when a browser opens it, so in a plain `streamlit run` the first
visitor waits for every import of the page (4-6 s of PyTorch and numba on the 2-core machine, most of a
first render). Imported here, they are in `sys.modules` when the script runs; and a background thread
prepares the default page's network (`warm_up`) while the server starts. `make app` and the browser tests
start the app this way.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"


def preload() -> None:
    """Import the library the pages use (no Streamlit API is touched before the server runs, and nothing is
    computed: the pages fill their caches themselves)."""
    import pandas  # noqa: F401
    import jpq_core.engine.program  # noqa: F401 - numba and the engine's kernels
    import jpq_core.live  # noqa: F401 - PyTorch and the live view
    import jpq_core.live_engine  # noqa: F401
    import jpq_core.plots  # noqa: F401 - plotly


def warm_up() -> None:
    """In a background thread while the server starts: the default page's network, its dense evaluation, scores
    and one compression (`LiveNetwork.warm_up`), so the first visitor finds them made. A failure here is only
    logged: the page computes the same things itself and shows any error properly."""
    from jpq_core.live import LiveConfig, shared_live_network

    try:
        shared_live_network(LiveConfig().network).warm_up()
    except Exception as exc:  # noqa: BLE001 - never stop the server for a warm-up
        print(f"warm-up skipped: {type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str]) -> None:
    preload()
    threading.Thread(target=warm_up, name="jpq-warm-up", daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *argv]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
