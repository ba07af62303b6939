#!/usr/bin/env bash
# The QM9 CPU-protocol runs of results/qm9 (issue 18), one method at a time so that finished runs
# can be committed as they complete; every call resumes (finished runs are skipped) and rewrites
# results/qm9/results.{json,md} from all finished runs. Reduced budget on the shared 2-core CPU:
# 5 epochs (1,080 steps of 512 molecules) instead of the ~30 of the protocol's defaults, and the
# 11 single-task networks (the Δm baseline, 11x the cost of a multi-task run) on seed 0 only.
set -u
cd "$(dirname "$0")/.."
FLAGS="--seeds 0 1 2 --single-task-seeds 0 --epochs 5 --batch-size 512 --eval-every 216 --schedule plateau --plateau-patience 2 --resume --no-tensorboard --no-plots --quiet --out results/qm9"
for m in equal imtl_h imtl_g imtl_l uncertainty nash_mtl mgda pcgrad cagrad famo dwa gls gradnorm gradnorm_gamma0 aligned_mtl upgrad mgda_closed_form "$@"; do
  python -m experiments qm9 --methods single_task $m $FLAGS || echo "run_qm9: $m failed (exit $?)"
done
