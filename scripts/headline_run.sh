#!/usr/bin/env bash
# The stereo headline run (issue 20): Taylor 95%, 4-bit weights, 8-bit activations, prune-then-quantize,
# one-shot pruning, masked fine-tuning with the rate held and decayed over the last 20% of each stage,
# 40,000 steps. Resumable: run it again and it goes on from cached_runs/long_run/stereo-headline.state (saved
# every 100 steps). Its learning curve (Middlebury bad-3 every 2,500 steps of each stage) is appended to
# cached_runs/long_run/stereo-headline-curve.jsonl. Both live in the repository so a fresh machine continues them:
# commit them with scripts/commit_long_run.sh. When it finishes, the state file is deleted and the network is
# saved as cached_runs/long_run/stereo-headline.safetensors (+ .json), its report in stereo-headline-report.json.
#   usage: scripts/headline_run.sh [--threads N] [--device cpu|cuda]   (extra arguments go to compress;
#          default --threads 1). LONG_RUN_DIR moves the state, curve and results elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
dir=${LONG_RUN_DIR:-cached_runs/long_run}
extra=("$@")
[ ${#extra[@]} -gt 0 ] || extra=(--threads 1)
mkdir -p "$dir"
"$PY" -m jpq_core compress --network stereo --criterion taylor --sparsity 0.95 --wbits 4 --abits 8 \
    --pipeline prune-then-quantize --finetune masked --schedule oneshot --lr-schedule constant-decay --steps 40000 \
    --state "$dir/stereo-headline.state" --curve "$dir/stereo-headline-curve.jsonl" --curve-every 2500 \
    --save "$dir/stereo-headline" --quiet --json "${extra[@]}" > "$dir/stereo-headline-report.json.tmp"
mv "$dir/stereo-headline-report.json.tmp" "$dir/stereo-headline-report.json"
