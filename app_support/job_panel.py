"""Explore's "Fine-tune this configuration": a budget, a start button, and this session's jobs of the
configuration, updated live. Views only: the queue itself is `jpq_core.jobs`."""

from __future__ import annotations

import time

import streamlit as st

from app_support.ui import job_owner, job_queue
from jpq_core.errors import JPQError
from jpq_core.jobs import Job, JobQueue, budgets, estimate_seconds, finetune_config, of_configuration
from jpq_core.live import LiveConfig

REFRESH_S = 1.0  # how often the job view reruns (and polls the queue) while a job of this session is active
_SEEN_ACTIVE = "job_panel_active"  # session_state: ids of this session's active jobs at the last refresh


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def finetune_panel(config: LiveConfig, results) -> None:
    """The control and the session's jobs of `config` (which must be on the shipped weights)."""
    queue = job_queue()
    target = config.compression_config()
    st.markdown("**Fine-tune this configuration**")
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    steps = left.radio("Fine-tuning budget", budgets(), horizontal=True, key="job_budget",
                       format_func=lambda n: f"{n:,} steps")
    estimate = estimate_seconds(results, config.network, steps)
    left.caption(f"About {duration(estimate)} on one core" if estimate is not None else "No measured fine-tuning "
                 "time of this network yet", help="the median wall time per step of this network's fine-tuned runs "
                 "in the results table, times the budget")
    if right.button("Fine-tune", key="job_start", type="primary"):
        try:
            queue.submit(job_owner(create=True), finetune_config(target, steps))
        except JPQError as exc:
            st.error(str(exc))
        else:
            st.rerun()  # again from the top: the link gains the job token, the job view refreshes itself
    st.caption(f"Runs in the background ({queue.slots} at a time on this server, one per core; others wait in "
               "line): pruning, quantization and distillation from the dense network, then the row joins the "
               "results table, here and on Trade-offs. Your jobs are kept with the link in the address bar.")
    owner = job_owner()
    try:
        if owner is None:
            queue.poll()  # any visit moves the queue on (e.g. jobs to continue after a server restart)
            return
        mine = queue.jobs_of(owner)[0]
    except JPQError as exc:  # the job folder cannot be used: the rest of the page still works
        st.error(str(exc))
        return
    _jobs_view(queue, owner, target, refresh=any(j.active for j in mine))


def _jobs_view(queue: JobQueue, owner: str, target, refresh: bool) -> None:
    @st.fragment(run_every=REFRESH_S if refresh else None)
    def view():
        try:
            jobs, problems = queue.jobs_of(owner)  # polling here is what moves the queue on
        except JPQError as exc:
            st.error(str(exc))
            return
        for problem in problems:
            st.warning(problem)
        here = of_configuration([j for j in jobs if not j.damaged], target) + [j for j in jobs if j.damaged]
        for job in here:
            _job(queue, owner, job)
        elsewhere = [j for j in jobs if j.active and j not in here]
        if elsewhere:
            st.caption(f"{len(elsewhere)} more of your jobs are queued or running for other configurations.")
        active = {j.id for j in jobs if j.active}
        ended = st.session_state.get(_SEEN_ACTIVE, set()) - active
        st.session_state[_SEEN_ACTIVE] = active
        if ended or (active and not refresh) or (refresh and not active):
            st.rerun(scope="app")  # a row to show above, or the refresh to start or stop

    view()


def _job(queue: JobQueue, owner: str, job: Job) -> None:
    label = "A job whose file is damaged" if job.damaged else f"{job.config['finetune']}, {job.budget:,} steps"
    if job.status == "queued":
        st.info(f"{label}: queued, number {job.position} in line (at most {queue.slots} jobs "
                "run at once).", icon="⏳")
    elif job.status == "running":
        progress = queue.progress(job)
        if job.ray_address:
            st.progress(0.0, text=f"{label}: running on the Ray cluster at {job.ray_address} for "
                                  f"{duration(time.time() - job.started)} (cluster nodes do not report their steps)")
        elif progress is None or progress.stage == "starting":
            st.progress(0.0, text=f"{label}: starting (loading the network, scoring and pruning it)")
        else:
            loss = f", loss {progress.loss:.4f}" if progress.loss is not None else ""
            eta = f", about {duration(progress.eta_s)} left" if progress.eta_s is not None and progress.done < progress.total else ""
            st.progress(progress.fraction, text=f"{label}: {progress.stage}, step {progress.done:,} of "
                                                f"{progress.total:,}{loss}{eta}")
    elif job.status == "done":
        st.success(f"{label}: finished; its row (id {job.row_id}) is in the fine-tuned runs above and on Trade-offs.")
    else:
        st.error(f"{label}: failed. {job.error}")
    if job.note and job.status != "done":
        st.caption(job.note[0].upper() + job.note[1:] + ".")
    if st.button("Cancel" if job.active else "Dismiss", key=f"job_cancel_{job.id}",
                 help="stop it and delete what it made (no row)" if job.active else "remove it from this list "
                 "(a finished job's row stays in the table)"):
        try:
            queue.cancel(owner, job.id)
        except JPQError as exc:
            st.error(str(exc))
        st.rerun(scope="app")
