#!/usr/bin/env bash
# Full-precision scores of the pretrained models on Set5 / Set14 / B100, gathered in results/fp_scores.md.
set -euo pipefail
cd "$(dirname "$0")/.."
opts=()
for arch in IMDN EMT; do
  for s in 2 3 4; do
    .venv/bin/python test.py -opt "options/test/${arch}_x${s}.yml"
    opts+=("options/test/${arch}_x${s}.yml")
  done
done
.venv/bin/python scripts/collect_scores.py results/fp_scores.md "${opts[@]}"
