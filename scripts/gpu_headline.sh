#!/usr/bin/env bash
# Continue the stereo headline run on a lent CUDA machine for at most SECONDS (default 480), then hand its state
# and curve back through $OUT. Meant for the device tool's `run`, in the repository root there, e.g.
#   run(command="bash scripts/gpu_headline.sh 480", carry=[".whl"], timeout_s=570)
# and then, here: stop the CPU run (kill its compress process), copy the returned files over
# cached_runs/long_run/ (the state holds its step; keep whichever of the two is further along), and commit.
# Before the first call, here: `echo /.whl/ >> .git/info/exclude` and download the wheel the GPU image lacks:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl torch-pruning==1.6.1
# (torch-pruning is pure Python; the image has torch, numba, scikit-image, safetensors, tqdm, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-480}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export PYTHONUNBUFFERED=1
# its own process group, so that the time limit stops compress too (a kill loses at most 100 steps: the state is
# replaced atomically at each save)
PYTHON=python3 setsid scripts/headline_run.sh --device cuda --threads 8 &
run=$!
(sleep "$seconds"; kill -KILL -- -"$run" 2>/dev/null) &
watch=$!
wait "$run"
status=$?
kill "$watch" 2>/dev/null
out=${OUT:-/tmp/gpu_headline_out}
mkdir -p "$out"
cp cached_runs/long_run/stereo-headline* "$out"/ 2>/dev/null
python3 - <<'PY'
import torch
try:
    s = torch.load("cached_runs/long_run/stereo-headline.state", weights_only=True, map_location="cpu")
    print(f"state: stage {s['stage']}, step {s['step']}, {s['elapsed']:.0f} s of run time")
except FileNotFoundError:
    print("no state file: the run finished (see stereo-headline-report.json)")
PY
echo "exit status $status (137: stopped at the time limit, as expected; the state was saved every 100 steps)"
