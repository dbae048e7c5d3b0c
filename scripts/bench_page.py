"""How fast Explore answers in a real browser: headless Chromium, the sparsity slider moved with the keyboard.

    python scripts/bench_page.py                      # this tree: first render, then 6 moves from 50%
    python scripts/bench_page.py --compare b9fd414    # also a baseline commit, in the same run, move for move
    python scripts/bench_page.py --network resnet20 --moves 2 --recovery none --json   # quick mode (CI: numbers, no goal)

For each tree: `streamlit run app.py` on a loopback port, Explore opened with the configuration in the URL
(stereo network, magnitude, 8/8 bits by default), then the sparsity slider moved one stop at a time. A move is
timed from the key press to (a) "answered": the cards show the new configuration's values (the "Sparsity
achieved" card changed and a bad-3 card is shown), and (b) "idle": Streamlit's script run is over, so every
card and map on the page is the new one. First render, the same two times from opening the URL: once on a
fresh server (network loading, dense evaluation included; `app_support.serve` imports before it listens)
and once in a second browser session on the warm server. With --compare, the baseline is exported with `git archive` into a temporary
folder and both servers run side by side; moves alternate between them, so load from other processes hits
both alike, and the ratio of medians is printed.

This machine is shared: every measurement is printed with the 1-minute load average (os.getloadavg).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_browser import (ROOT, app_server, ensure_chromium, is_idle, make_driver, metrics,  # noqa: E402
                         sparsity_thumb)
from selenium.webdriver.common.keys import Keys  # noqa: E402

POLL_S = 0.05  # polling period of the page while a move is timed
TIMEOUT_S = 300.0


def load() -> float:
    return os.getloadavg()[0]


def export_tree(ref: str, into: Path) -> Path:
    """The committed files of `ref` in a plain folder (no worktree, no branch switch)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def first_render(driver, url: str) -> tuple[float, float]:
    """Seconds from opening `url` to (answered) the cards on the page, and to (idle) the end of the script run,
    e.g. after recovery replaced them."""
    start = time.perf_counter()
    driver.get(url)
    answered = None
    while time.perf_counter() - start < TIMEOUT_S:
        if answered is None and "Sparsity achieved" in metrics(driver):
            answered = time.perf_counter() - start
        if answered is not None and is_idle(driver):
            return answered, time.perf_counter() - start
        time.sleep(POLL_S)
    raise TimeoutError(f"the page did not finish its first render in {TIMEOUT_S:.0f} s")


def timed_move(driver, card: str) -> dict:
    """One keyboard step of the sparsity slider; seconds to the new values (card `card` shown beside a changed
    "Sparsity achieved"), and to the end of the script run."""
    before = metrics(driver)
    thumb = sparsity_thumb(driver)
    start = time.perf_counter()
    thumb.send_keys(Keys.ARROW_RIGHT)
    answered = None
    deadline = start + TIMEOUT_S
    while time.perf_counter() < deadline:
        shown = metrics(driver)
        now = time.perf_counter()
        changed = shown.get("Sparsity achieved") not in (None, before.get("Sparsity achieved")) and card in shown
        if changed and answered is None:
            answered = now - start
        if changed and is_idle(driver):
            return {"answered_s": answered, "idle_s": now - start, "sparsity": shown["Sparsity achieved"],
                    card: shown[card], "engine": shown.get("Computed by"), "load": load()}
        time.sleep(POLL_S)
    raise TimeoutError(f"the page did not answer a slider move within {TIMEOUT_S:.0f} s")


def _summary(rows: list[dict], first: dict) -> dict:
    return {**first, "moves": rows, "median_answered_s": statistics.median(r["answered_s"] for r in rows),
            "median_idle_s": statistics.median(r["idle_s"] for r in rows)}


def run(trees: dict[str, Path], query: str, moves: int, echo, screenshots: Path | None = None, card: str = "bad-3") -> dict:
    chromium, chromedriver = ensure_chromium()
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(app_server(root)) for name, root in trees.items()}
        firsts, drivers = {}, {}
        for name, url in urls.items():  # one at a time: two cold starts at once would measure each other
            cold = make_driver(chromium, chromedriver)
            stack.callback(cold.quit)
            answered, idle = first_render(cold, f"{url}/?{query}")
            firsts[name] = {"first_answer_cold_s": answered, "first_render_cold_s": idle, "load_cold": load()}
            drivers[name] = make_driver(chromium, chromedriver)
            stack.callback(drivers[name].quit)
            answered, idle = first_render(drivers[name], f"{url}/?{query}")
            firsts[name].update(first_answer_warm_s=answered, first_render_warm_s=idle, load_warm=load())
            f = firsts[name]
            echo(f"[{name}] first render (cards shown / script run over): {f['first_answer_cold_s']:.2f} / "
                 f"{f['first_render_cold_s']:.2f} s on a fresh server (load {f['load_cold']:.2f}), "
                 f"{f['first_answer_warm_s']:.2f} / {f['first_render_warm_s']:.2f} s in a new session "
                 f"(load {f['load_warm']:.2f})")
        rows = {name: [] for name in trees}
        for i in range(moves):
            for name, driver in drivers.items():  # alternate trees, so that load hits both alike
                row = timed_move(driver, card)
                rows[name].append(row)
                echo(f"[{name}] move {i + 1}: sparsity {row['sparsity']}, {card} {row[card]}: answered in "
                     f"{row['answered_s']:.2f} s, idle in {row['idle_s']:.2f} s (load {row['load']:.2f})"
                     + (f"; {row['engine']}" if row["engine"] else ""))
        if screenshots:
            screenshots.mkdir(parents=True, exist_ok=True)
            for name, driver in drivers.items():
                driver.save_screenshot(str(screenshots / f"bench-page-{name.replace(' ', '-')}.png"))
    result = {"query": query, "moves": moves, "trees": {name: _summary(rows[name], firsts[name]) for name in trees}}
    for name, summary in result["trees"].items():
        echo(f"[{name}] median of {moves} moves: answered {summary['median_answered_s']:.2f} s, "
             f"idle {summary['median_idle_s']:.2f} s; first render {summary['first_render_cold_s']:.2f} s cold, "
             f"{summary['first_render_warm_s']:.2f} s warm")
    if "baseline" in result["trees"]:
        base, this = result["trees"]["baseline"], result["trees"]["this tree"]
        result["ratio_idle"] = this["median_idle_s"] / base["median_idle_s"]
        result["ratio_first_render_cold"] = this["first_render_cold_s"] / base["first_render_cold_s"]
        echo(f"this tree / baseline, same run: median move {result['ratio_idle']:.2f}x, "
             f"first render (fresh server) {result['ratio_first_render_cold']:.2f}x")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="stereo")
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--start", default="0.5", help="sparsity the page opens at (the slider moves up from it)")
    parser.add_argument("--wbits", default="8")
    parser.add_argument("--abits", default="8")
    parser.add_argument("--recovery", help="recovery in the link (default: none given, the page's own, auto); the "
                        "quick mode gives `none`, so that every render and move is the compression alone")
    parser.add_argument("--moves", type=int, default=6, help="slider stops to time (>= 5 for a median)")
    parser.add_argument("--compare", metavar="REF", help="also time this git commit or branch, in the same run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    parser.add_argument("--screenshots", type=Path, help="folder for a screenshot of each tree after the last move")
    args = parser.parse_args(argv)
    if args.moves < 1:
        parser.error("--moves must be 1 or more")
    query = (f"network={args.network}&criterion={args.criterion}&sparsity={args.start}&wbits={args.wbits}"
             f"&abits={args.abits}" + (f"&recovery={args.recovery}" if args.recovery else ""))
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        trees = {"this tree": ROOT}
        if args.compare:
            trees = {"baseline": export_tree(args.compare, Path(tmp) / "baseline"), **trees}
        echo = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
        echo(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 shared cores)")
        result = run(trees, query, args.moves, echo, args.screenshots, "bad-3" if args.network == "stereo" else "Top-1")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
