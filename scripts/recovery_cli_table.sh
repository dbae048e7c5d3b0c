#!/bin/sh
# The recovery table of docs/results.md: stereo (Middlebury, full resolution) or ResNet-20 (digits), magnitude,
# w4/a8, prune-then-quantize, no fine-tuning, one `compress --json` line per (sparsity, recovery). Arguments
# after the third go to every compress call.
#   sh scripts/recovery_cli_table.sh stereo "0.8 0.9 0.95" "none bn lsq lsq+bn obc obc+bn" > out.jsonl
#   sh scripts/recovery_cli_table.sh stereo "0.8 0.9 0.95" "lsq+scale" --allocation recovery-aware --recovery-samples 16
network=$1; sparsities=$2; methods=$3
shift 3
for s in $sparsities; do
  for m in $methods; do
    python -m jpq_core compress --network "$network" --criterion magnitude --sparsity "$s" --wbits 4 --abits 8 \
      --finetune none --recovery "$m" --threads 2 --quiet --json "$@"
  done
done
