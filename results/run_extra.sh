#!/usr/bin/env bash
# The other runs of results/ (issue 18), after results/run_qm9.sh: the parameter-level methods on
# QM9 (same reduced budget), and the paper's x10 loss-rescale robustness test on MultiMNIST with
# 3 seeds (the four loss/gradient balancing variants it is about). Each call resumes.
set -u
cd "$(dirname "$0")/.."
python -m experiments qm9 --methods single_task imtl_g_exact nash_mtl@params --seeds 0 1 2 --single-task-seeds 0 \
  --epochs 5 --batch-size 512 --eval-every 216 --schedule plateau --plateau-patience 2 --resume --no-tensorboard \
  --no-plots --quiet --out results/qm9
python -m experiments robustness --benchmark multimnist --methods equal imtl_l imtl_g imtl_h --seeds 0 1 2 --resume \
  --no-tensorboard --quiet --out results/robustness
