"""JPQ Explorer: the dashboard's entry point. Run with `make app` (or `streamlit run app.py`).

Explore (pages/0_Explore.py) is the landing page; every page arranges views and calls `jpq_core`.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).parent / "pages"
TITLES = {"0_Explore.py": "Explore", "1_Classifier.py": "Classifier", "2_Taylor_scores.py": "Taylor scores",
          "3_Depth_maps.py": "Depth maps", "4_Trade-offs.py": "Trade-offs", "5_Engine.py": "Engine", "6_Learn.py": "Learn"}

st.navigation([st.Page(str(page), title=TITLES.get(page.name, page.stem.split("_", 1)[-1].replace("_", " ")),
                       default=page.name == "0_Explore.py")
               for page in sorted(PAGES.glob("*.py"))]).run()
