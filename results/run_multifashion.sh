#!/usr/bin/env bash
# The MultiFashion CPU-protocol runs of results/multifashion (issue 18): 24,000 / 4,000 / 20,000
# pairs, LeNet, 3 seeds, one method at a time (every call resumes and rewrites the table).
# Reduced budget on the shared 2-core CPU: 3 epochs (279 steps of 256 pairs).
set -u
cd "$(dirname "$0")/.."
FLAGS="--seeds 0 1 2 --epochs 3 --batch-size 256 --eval-every 93 --schedule plateau --plateau-patience 2 --resume --no-tensorboard --no-plots --quiet --out results/multifashion"
for m in equal imtl_h imtl_g imtl_l uncertainty mgda pcgrad cagrad nash_mtl famo "$@"; do
  python -m experiments multifashion --methods single_task $m $FLAGS || echo "run_multifashion: $m failed (exit $?)"
done
