"""The tour notebook runs top to bottom on the current library (executed with nbclient, so it cannot rot)."""

import nbformat
from nbclient import NotebookClient


def test_the_tour_notebook_runs_and_shows_measured_results(root, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: one torch thread, as in the other tests
    # Importing streamlit (the app tests do) sets MPLBACKEND=Agg for the whole process; the kernel would inherit
    # it and draw no inline figures.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(root / "notebooks" / "tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    def shown(cell):
        return "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for out in cell.outputs)

    text = "\n".join(shown(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "dense top-1 on the digits test split: 100.00%" in text
    comparison = shown(next(c for c in nb.cells if c.cell_type == "code" and "compared = " in c.source))
    assert all(name in comparison for name in ("taylor", "magnitude", "random", "top-1", "memory vs dense"))
    assert "0 problems" in text  # the shipped results table reads cleanly
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3
