#!/usr/bin/env bash
# Budget probe for the converged protocol: equal weighting, 5 seeds, trained far past the
# budgets the earlier tables used (QM9 100 epochs, MultiFashion 40 epochs), evaluated every
# epoch. The validation curves (results/budget_probe/*/curves.json, curves.png) choose each
# benchmark's epoch budget. Resumable: every call skips finished runs.
# CODE (default: this checkout) is the tree whose code runs; results go to this checkout.
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
cd "${CODE:-$HERE}"
COMMON="--methods equal --seeds 0 1 2 3 4 --schedule plateau --resume --no-tensorboard --no-plots --quiet"
python -m experiments qm9 $COMMON --epochs 100 --batch-size 512 --eval-every 216 --plateau-patience 5 \
  --out "$HERE/results/budget_probe/qm9" || echo "budget probe: qm9 failed (exit $?)"
python -m experiments multifashion $COMMON --epochs 40 --batch-size 256 --eval-every 93 --plateau-patience 5 \
  --out "$HERE/results/budget_probe/multifashion" || echo "budget probe: multifashion failed (exit $?)"
