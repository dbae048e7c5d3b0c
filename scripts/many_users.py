"""Many users at once: four headless Chromium sessions against one app server while a fine-tuning job runs.

    nice -n 10 python scripts/many_users.py                 # 4 sessions, a 100-step job
    nice -n 10 python scripts/many_users.py --sessions 2 --steps 20 --json many-users.json

Issue 22 asks that sessions moving sliders at the same time each see their own configuration's numbers and no
exception on any page. This script (not in the test suite: on a shared 2-core machine it takes many minutes):
1. starts `streamlit run app.py` on a loopback port with a scratch results table (`JPQ_RESULTS`), and a
   fine-tuning job on it through the page's own queue (`jpq_core.jobs.JobQueue`, ResNet-20 on digits, as the
   Explore page's "Fine-tune" button submits it), so every page load also polls a live queue;
2. opens the sessions at once (one thread each), each on its own link (ResNet-20, its own sparsity and weight
   bits), moves its sparsity slider by its own number of stops with the keyboard, waits for the new numbers,
   and records its link (the link follows the sliders) and every metric card;
3. checks that each link holds the configuration that session chose (start sparsity + its stops), that the
   sessions' weight memories differ (different configurations), and that a fresh browser opened on each
   session's link shows exactly the same cards: a session shown another's numbers would differ;
4. has every session visit every page with its link: no `stException` element anywhere;
5. waits for the job to finish: done, exactly one row in the table.
Prints a tally (and writes it with --json); exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from app_browser import app_server, ensure_chromium, is_idle, make_driver, metrics, move_sparsity, texts, wait_metric  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from jpq_core.live import SPARSITY_CHOICES  # noqa: E402

# (start sparsity, weight bits, slider stops to the right) per session: four different final configurations
PLANS = [(0.5, 8, 1), (0.5, 4, 3), (0.7, 8, 4), (0.3, 4, 2), (0.6, 8, 5), (0.4, 4, 6)]


def page_paths() -> list[str]:
    """URL paths Streamlit gives the pages (as tests/test_browser.py): file name without number and extension."""
    return [""] + [re.sub(r"^\d+_", "", p.stem) for p in sorted((ROOT / "pages").glob("*.py"))]


def link_config(url: str) -> dict[str, str]:
    from urllib.parse import parse_qs, urlparse

    return {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}


def exceptions_shown(driver) -> list[str]:
    return [t[:300] for t in texts(driver, '[data-testid="stException"]')]


def run_session(index: int, url: str, make, timeout: float, out: dict, failures: list, start_together: threading.Barrier):
    """One user: open its link, move its slider, record its link and cards, then visit every page."""
    sparsity, wbits, stops = PLANS[index]
    record = out.setdefault(index, {"plan": {"sparsity": sparsity, "wbits": wbits, "stops": stops}})
    try:
        driver = make()
        record["driver"] = driver
        start_together.wait(timeout=timeout)
        t0 = time.time()
        driver.get(f"{url}/?network=resnet20&criterion=magnitude&sparsity={sparsity}&wbits={wbits}&abits=8&recovery=none")
        before = wait_metric(driver, "Weight memory", timeout=timeout)
        record["first_page_s"] = round(time.time() - t0, 1)
        move_sparsity(driver, stops)
        wait_metric(driver, "Weight memory", other_than=before, timeout=timeout)
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(is_idle)
        time.sleep(1.0)  # a rerun the link change may start
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(is_idle)
        record["link"] = driver.current_url
        record["cards"] = metrics(driver)
        record["exceptions"] = exceptions_shown(driver)
        expected = SPARSITY_CHOICES[SPARSITY_CHOICES.index(sparsity) + stops]
        chosen = link_config(driver.current_url)
        if float(chosen.get("sparsity", "nan")) != expected or chosen.get("wbits") != str(wbits):
            failures.append(f"session {index}: its link says sparsity={chosen.get('sparsity')} wbits={chosen.get('wbits')}, "
                            f"it chose sparsity={expected} wbits={wbits}")
        pages = {}
        query = driver.current_url.split("?", 1)[1]
        for path in page_paths():
            t0 = time.time()
            driver.get(f"{url}/{path}?{query}")
            WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: is_idle(d) and d.find_elements(By.CSS_SELECTOR, "h1"))
            time.sleep(1.0)
            WebDriverWait(driver, timeout, poll_frequency=0.5).until(is_idle)
            shown = exceptions_shown(driver)
            pages[path or "Explore"] = {"seconds": round(time.time() - t0, 1), "exceptions": len(shown)}
            failures.extend(f"session {index}, page /{path}: {text}" for text in shown)
        record["pages"] = pages
    except Exception as exc:  # noqa: BLE001 - a session that cannot go on is a failure to report, not a crash
        failures.append(f"session {index}: {type(exc).__name__}: {str(exc)[:300]}")
        record["trace"] = traceback.format_exc()[-1500:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4, choices=range(1, len(PLANS) + 1))
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of the job that runs meanwhile")
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one wait may take (2 loaded cores)")
    parser.add_argument("--json", type=Path, help="also write the tally here")
    args = parser.parse_args(argv)

    from jpq_core.jobs import JobQueue, finetune_config, new_owner
    from jpq_core.pipeline import CompressionConfig
    from jpq_core.sweeps import read_rows

    chromium, chromedriver = ensure_chromium()
    work = Path(tempfile.mkdtemp(prefix="many-users-"))
    table = work / "results" / "sweeps.jsonl"
    env = {"JPQ_RESULTS": str(table), "JPQ_JOB_BUDGETS": f"{args.steps},300"}
    os.environ.update(env)  # the script's own queue reads the same table as the server
    failures: list[str] = []
    sessions: dict = {}
    tally: dict = {"sessions": args.sessions, "job_steps": args.steps}
    drivers = []
    lock = threading.Lock()

    def make():
        driver = make_driver(chromium, chromedriver)
        with lock:
            drivers.append(driver)
        return driver

    start = time.time()
    queue = JobQueue(table)
    try:
        with app_server(ROOT, log_dir=work, env=env) as url:
            owner = new_owner()
            job = queue.submit(owner, finetune_config(CompressionConfig(network="resnet20", criterion="magnitude",
                                                                        sparsity=0.9, wbits=4, abits=8), args.steps))
            print(f"server {url}; job {job.id} ({args.steps} steps) submitted; {args.sessions} sessions start", flush=True)
            together = threading.Barrier(args.sessions)
            threads = [threading.Thread(target=run_session, args=(i, url, make, args.timeout, sessions, failures, together))
                       for i in range(args.sessions)]
            for t in threads:
                t.start()
            job_states = set()
            while any(t.is_alive() for t in threads):
                job_states |= {j.status for j in queue.jobs_of(owner)[0]}
                time.sleep(2)
            tally["job_status_while_sessions_ran"] = sorted(job_states)
            tally["sessions_s"] = round(time.time() - start)
            print(f"sessions done in {tally['sessions_s']} s; checking each link in a fresh browser", flush=True)

            # each session's cards against a fresh browser's on the same link
            fresh = make()
            memories = []
            for index, record in sorted(sessions.items()):
                if "cards" not in record:
                    continue
                try:
                    fresh.get(record["link"])
                    wait_metric(fresh, "Weight memory", timeout=args.timeout)
                    WebDriverWait(fresh, args.timeout, poll_frequency=0.5).until(is_idle)
                    time.sleep(1.0)
                    WebDriverWait(fresh, args.timeout, poll_frequency=0.5).until(is_idle)
                except Exception as exc:  # noqa: BLE001 - note it, keep what the page showed, check the others
                    fresh.save_screenshot(str(work / f"fresh-{index}.png"))
                    failures.append(f"session {index}: a fresh browser on its link did not settle ({type(exc).__name__}); "
                                    f"it showed {metrics(fresh)}, exceptions {exceptions_shown(fresh)}, screenshot "
                                    f"{work / f'fresh-{index}.png'}")
                    continue
                reference = metrics(fresh)
                record["same_cards_as_a_fresh_browser"] = reference == record["cards"]
                if reference != record["cards"]:
                    failures.append(f"session {index}: cards {record['cards']} but a fresh browser on its link shows {reference}")
                memories.append(record["cards"].get("Weight memory"))
            if len(set(memories)) != len(memories):
                failures.append(f"sessions with different configurations show the same weight memory: {memories}")

            deadline = time.time() + args.timeout
            while time.time() < deadline:
                mine = queue.jobs_of(owner)[0]
                if mine and not mine[0].active:
                    break
                time.sleep(2)
            final = queue.jobs_of(owner)[0]
            rows = read_rows(table)[0]
            tally["job"] = {"status": final[0].status if final else "gone", "rows": len(rows),
                            "error": final[0].error if final else None}
            if not final or final[0].status != "done" or len(rows) != 1:
                failures.append(f"the job ended {tally['job']}")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"setup: {type(exc).__name__}: {str(exc)[:500]}")
    finally:
        for driver in drivers:
            driver.quit()
        for job in queue._read_all()[0]:  # no job process outlives the script
            if job.active:
                queue.cancel(job.owner, job.id)

    tally["seconds"] = round(time.time() - start)
    tally["sessions_detail"] = {i: {k: v for k, v in r.items() if k != "driver"} for i, r in sorted(sessions.items())}
    tally["failures"] = failures
    for index, record in sorted(sessions.items()):
        print(f"session {index}: plan {record['plan']}, link {record.get('link', '-').split('?')[-1]}, cards "
              f"{record.get('cards')}, same as a fresh browser: {record.get('same_cards_as_a_fresh_browser')}, pages "
              f"{record.get('pages')}")
    print(f"job: {tally.get('job')}; failures: {len(failures)}")
    for failure in failures:
        print("  FAILURE", failure)
    if args.json:
        args.json.write_text(json.dumps(tally, indent=2, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
