#!/usr/bin/env bash
# Commit the long run's state and curve (cached_runs/long_run/) every INTERVAL seconds (default 40 min) while it
# runs, so a stopped session loses at most that much of it. Commits only those files; when git is busy (a merge
# in progress, a lock held) it tries again five minutes later.
#   usage: scripts/commit_long_run.sh [INTERVAL_SECONDS]
cd "$(dirname "$0")/.."
interval=${1:-2400}
while true; do
  sleep "$interval"
  for attempt in 1 2 3 4 5 6; do
    git add -A cached_runs/long_run 2>/dev/null
    if git diff --cached --quiet -- cached_runs/long_run; then break; fi
    step=$(tail -n 1 cached_runs/long_run/stereo-headline-curve.jsonl 2>/dev/null | sed -n 's/.*"step": \([0-9]*\).*/\1/p')
    git commit -q -m "Stereo headline run: state and curve saved (last curve point at step ${step:-none})" \
        -- cached_runs/long_run && break
    sleep 300
  done
done
